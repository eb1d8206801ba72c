"""Reads of the delivery app: the aggregation pipeline's status, for the admin page and
``/metrics``."""

import json
import time
from dataclasses import dataclass

from django.conf import settings

from counters.redis import get_redis

from . import keys


@dataclass(frozen=True)
class ShardStatus:
    shard: int
    length: int  # events held (waiting or unacknowledged)
    pending: int  # read by an aggregator, not yet acknowledged
    lag_seconds: float  # age of the oldest event held


@dataclass(frozen=True)
class PipelineStatus:
    shards: list[ShardStatus]
    recent_flushes: list[dict]
    totals: dict[str, float]

    @property
    def queued(self) -> int:
        return sum(s.length for s in self.shards)

    @property
    def lag_seconds(self) -> float:
        return max((s.lag_seconds for s in self.shards), default=0.0)


def pipeline_status(*, recent: int = 50) -> PipelineStatus:
    """Queue lengths, lag, recent flushes and totals of the aggregation pipeline, read from
    Redis in two round trips (for the admin page and /metrics)."""
    client = get_redis()
    n = settings.COUNTERS_SHARDS
    pipe = client.pipeline(transaction=False)
    for shard in range(n):
        stream = keys.shard_stream(shard)
        pipe.xlen(stream)
        pipe.xrange(stream, count=1)
    pipe.lrange(keys.METRICS_FLUSHES, 0, recent - 1)
    pipe.hgetall(keys.METRICS_TOTALS)
    replies = pipe.execute()
    pending_pipe = client.pipeline(transaction=False)
    for shard in range(n):
        pending_pipe.xpending(keys.shard_stream(shard), keys.GROUP)
    pendings = pending_pipe.execute(raise_on_error=False)
    now_ms = time.time() * 1000
    shards = []
    for shard in range(n):
        length, first = replies[2 * shard], replies[2 * shard + 1]
        oldest = int(first[0][0].split("-")[0]) if first else None
        pending = pendings[shard]
        shards.append(
            ShardStatus(
                shard=shard,
                length=int(length),
                pending=int(pending["pending"]) if isinstance(pending, dict) else 0,
                lag_seconds=max((now_ms - oldest) / 1000, 0.0) if oldest else 0.0,
            )
        )
    flushes = [json.loads(item) for item in replies[2 * n]]
    totals = {k: float(v) for k, v in replies[2 * n + 1].items()}
    return PipelineStatus(shards=shards, recent_flushes=flushes, totals=totals)
