"""The counters app keeps its state in Redis (layout in :mod:`counters.keys`); it has no
tables. Its status page moved to the delivery app with the aggregation pipeline."""
