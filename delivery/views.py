"""``/metrics``: the counter pipeline for Prometheus, read from Redis at scrape time (so the
figures of every worker process add up without prometheus-client's multiprocess mode)."""

from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .selectors import pipeline_status

TOTALS = {
    "events_in": "queue events the aggregators applied",
    "logical_updates": "per-member counter updates those events stand for",
    "writes_out": "(user, conversation) counter writes made",
    "users": "counter calls made (one per user per batch)",
    "flushes": "aggregator batches",
    "duration_seconds": "time spent applying batches",
}


class PipelineCollector:
    def collect(self):
        status = pipeline_status(recent=1)
        length = GaugeMetricFamily(
            "imcore_counter_queue_length", "Events held by a queue shard", labels=["shard"]
        )
        pending = GaugeMetricFamily(
            "imcore_counter_queue_pending", "Events read but not acknowledged", labels=["shard"]
        )
        lag = GaugeMetricFamily(
            "imcore_counter_queue_lag_seconds", "Age of a shard's oldest event", labels=["shard"]
        )
        for s in status.shards:
            length.add_metric([str(s.shard)], s.length)
            pending.add_metric([str(s.shard)], s.pending)
            lag.add_metric([str(s.shard)], s.lag_seconds)
        yield from (length, pending, lag)
        for name, help_text in TOTALS.items():
            yield CounterMetricFamily(
                f"imcore_counter_{name.removesuffix('_total')}",
                help_text,
                value=status.totals.get(name, 0.0),
            )
        last = status.recent_flushes[0] if status.recent_flushes else {}
        for name, key, scale in (
            ("last_flush_batch_age_seconds", "batch_age_ms", 1000),
            ("last_flush_duration_seconds", "duration_ms", 1000),
            ("last_flush_ratio", "ratio", 1),
        ):
            yield GaugeMetricFamily(
                f"imcore_counter_{name}",
                f"{key} of the newest batch",
                value=last.get(key, 0) / scale,
            )


def metrics_view(request):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
