"""Celery tasks of the counters app.

``counters.fanout_message`` counts one committed message for every member of its
conversation: one task per message, one pipelined round trip per 1,000 members. It is
idempotent (the message seq is the idempotency key; tops only move up), so it runs with
``acks_late`` and a redelivery after a crash is harmless. Under a burst, tasks queue up in the
broker and each stays O(members); the aggregation pipeline of the next issue replaces it.

The aggregation pipeline (see :mod:`counters.pipeline`), three tasks Flower shows apart:

- ``counters.timer`` (Celery beat, every ``COUNTERS_FLUSH_INTERVAL``): requests an aggregate of
  every non-empty shard. One task per interval whatever the load.
- ``counters.flusher`` (sent when an enqueue takes a shard past ``COUNTERS_FLUSH_THRESHOLD``;
  a flag makes it once per flush): re-checks the shard's length and requests its aggregate.
- ``counters.aggregate`` (one per shard per flush, at most one requested at a time): drains a
  shard. Under a burst, more events fold into each batch instead of more tasks running.

``counters.reconcile`` rebuilds counters from PostgreSQL (all users, or the ones given) and
logs what differed; Celery beat runs it every ``COUNTERS_RECONCILE_INTERVAL_S``.
"""

import redis
from celery import shared_task

from . import pipeline, services


@shared_task(
    name="counters.fanout_message",
    queue="counters",
    acks_late=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    max_retries=8,
)
def fanout_message(conversation_id: int, seq: int, sender_id: int | None = None) -> int:
    return services.counters_fanout(conversation_id=conversation_id, seq=seq, sender_id=sender_id)


@shared_task(name="counters.reconcile", queue="counters", max_retries=0)
def reconcile(user_ids: list[int] | None = None) -> dict:
    report = services.counters_reconcile(user_ids=user_ids)
    return {
        "users_checked": report.users_checked,
        "users_differed": len(report.diffs),
        "users_not_loaded": report.users_not_loaded,
    }


@shared_task(name="counters.timer", queue="counters", max_retries=0, expires=10)
def timer() -> list[int]:
    return pipeline.counters_timer_tick()


@shared_task(name="counters.flusher", queue="counters", max_retries=0)
def flusher(shard: int) -> bool:
    return pipeline.counters_flusher_check(shard=shard)


@shared_task(
    name="counters.aggregate",
    queue="counters",
    acks_late=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    max_retries=5,
)
def aggregate(shard: int, trigger: str = "timer") -> dict:
    batches = pipeline.counters_aggregate_shard(shard=shard, trigger=trigger)
    return {
        "shard": shard,
        "batches": len(batches),
        "events_in": sum(b.events_in for b in batches),
        "writes_out": sum(b.writes_out for b in batches),
    }
