"""Celery tasks of the delivery app. Their names keep the ``counters.`` prefix they had before
the delivery app existed, so that queued messages and beat's stored schedule rows survive the
move.

``counters.fanout_message`` (``DELIVERY_WRITE_PATH=fanout``) delivers one committed message to
every member of its conversation: one task per message, one pipelined round trip per 1,000
members. It is idempotent (the message seq is the idempotency key; tops only move up), so it
runs with ``acks_late`` and a redelivery after a crash is harmless. Under a burst, tasks queue
up in the broker and each stays O(members); the aggregation pipeline replaces it.

The aggregation pipeline (see :mod:`delivery.pipeline`), three tasks Flower shows apart:

- ``counters.timer`` (Celery beat, every ``COUNTERS_FLUSH_INTERVAL``): requests an aggregate of
  every non-empty shard. One task per interval whatever the load.
- ``counters.flusher`` (sent when an enqueue takes a shard past ``COUNTERS_FLUSH_THRESHOLD``;
  a flag makes it once per flush): re-checks the shard's length and requests its aggregate.
- ``counters.aggregate`` (one per shard per flush, at most one requested at a time): drains a
  shard. Under a burst, more events fold into each batch instead of more tasks running.

``counters.batch_message`` (``DELIVERY_WRITE_PATH=batches``): one task message per committed
message, of class ``celery_batches.Batches``. The worker buffers the messages it receives and
runs the task once per buffer, with the list of requests, every
``COUNTERS_BATCHES_FLUSH_EVERY`` messages or ``COUNTERS_FLUSH_INTERVAL`` seconds, whichever
comes first; the body is the Aggregator's :func:`delivery.pipeline.delivery_apply_events`.
Buffered messages are not acknowledged: with ``acks_late`` a batch's messages are acknowledged
when its body has returned, so the worker must be allowed to hold a buffer and a running
batch unacknowledged (the prefetch of ``imcore.settings``). A worker SIGKILLed with a buffer
loses nothing from the broker, but its messages wait in the broker's unacked set until the
visibility timeout (an hour) or a reconcile. celery-batches acknowledges a batch whose body
raised and never retries it, so the task sends its folded events again itself, each event at
most ``COUNTERS_BATCHES_MAX_RESENDS`` times, 1 s, 2 s, 4 s ... apart (at most
``BATCH_RESEND_MAX_DELAY_S``): past that it is dropped and logged, so an outage of Redis or
PostgreSQL cannot keep a batch going round for ever. A dropped event is repaired by the next
message of its conversation (counts and offline entries move up to the newest seq) or by the
reconcile.
"""

import logging

import django.db
import redis
from celery import shared_task
from celery_batches import Batches
from django.conf import settings

from . import pipeline, services
from .mentions import mention_event

logger = logging.getLogger(__name__)

# Longest wait before a failed batch's events are sent again, in seconds.
BATCH_RESEND_MAX_DELAY_S = 60


@shared_task(
    name="counters.fanout_message",
    queue="counters",
    acks_late=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    max_retries=8,
)
def fanout_message(
    conversation_id: int,
    seq: int,
    sender_id: int | None = None,
    mentions: list[int] | None = None,
    mention_all: bool = False,
) -> int:
    return services.delivery_fanout(
        conversation_id=conversation_id,
        seq=seq,
        sender_id=sender_id,
        mentions=mentions or (),
        mention_all=mention_all,
    )


@shared_task(
    base=Batches,
    name="counters.batch_message",
    queue="counters",
    acks_late=True,
    flush_every=settings.COUNTERS_BATCHES_FLUSH_EVERY,
    flush_interval=settings.COUNTERS_FLUSH_INTERVAL,
)
def batch_message(requests) -> int:
    """Called as ``batch_message.delay(conversation_id=, seq=, sent_ms=)`` (plus ``sender_id=,
    mentions=, mention_all=`` for a message with mentions); runs with the buffered requests.
    An event sent again after a failed batch carries ``resends``, how many times it was sent
    again so far."""
    events = [_event(r.kwargs) for r in requests]
    sent = [r.kwargs["sent_ms"] for r in requests if r.kwargs.get("sent_ms")]
    try:
        pipeline.delivery_apply_events(events, oldest_ms=min(sent, default=None))
    except (redis.ConnectionError, redis.TimeoutError, django.db.OperationalError) as exc:
        # The batch is acknowledged all the same: send its events again, folded, for later.
        _send_again(requests, exc)
        raise
    return len(events)


def _event(kwargs: dict) -> tuple:
    return mention_event(
        kwargs["conversation_id"],
        kwargs["seq"],
        sender_id=kwargs.get("sender_id"),
        mentions=kwargs.get("mentions") or (),
        mention_all=kwargs.get("mention_all", False),
    )


def _send_again(requests, exc: Exception) -> None:
    """Send a failed batch's folded events again, unless an event was sent again
    ``COUNTERS_BATCHES_MAX_RESENDS`` times already: then drop it and log it."""
    resends: dict[tuple[int, int], int] = {}  # the fewest resends of each event in the batch
    for r in requests:
        event = (r.kwargs["conversation_id"], r.kwargs["seq"])
        resends[event] = min(resends.get(event, 10**9), r.kwargs.get("resends", 0))
    dropped = []
    for cid, seq in pipeline.fold_events(resends).items():
        done = resends[cid, seq]
        if done >= settings.COUNTERS_BATCHES_MAX_RESENDS:
            dropped.append((cid, seq))
            continue
        delay = min(2**done, BATCH_RESEND_MAX_DELAY_S)
        logger.warning(
            "counters.batch_message: conversation %s seq %s failed (%s); sending it again in "
            "%s s (resend %s of %s)",
            cid,
            seq,
            exc,
            delay,
            done + 1,
            settings.COUNTERS_BATCHES_MAX_RESENDS,
        )
        batch_message.apply_async(
            kwargs={"conversation_id": cid, "seq": seq, "resends": done + 1}, countdown=delay
        )
    for r in requests:
        # A message with mentions goes again as it was: its seq may be below the folded top.
        if "sender_id" not in r.kwargs:
            continue
        done = r.kwargs.get("resends", 0)
        if done >= settings.COUNTERS_BATCHES_MAX_RESENDS:
            dropped.append((r.kwargs["conversation_id"], r.kwargs["seq"]))
            continue
        kwargs = {k: v for k, v in r.kwargs.items() if k != "sent_ms"}
        batch_message.apply_async(
            kwargs={**kwargs, "resends": done + 1},
            countdown=min(2**done, BATCH_RESEND_MAX_DELAY_S),
        )
    if dropped:
        logger.error(
            "counters.batch_message: dropped %s events after %s resends (the next message of "
            "each conversation, or the reconcile, repairs them): %s",
            len(dropped),
            settings.COUNTERS_BATCHES_MAX_RESENDS,
            dropped,
        )


@shared_task(name="counters.timer", queue="counters", max_retries=0, expires=10)
def timer() -> list[int]:
    return pipeline.delivery_timer_tick()


@shared_task(name="counters.flusher", queue="counters", max_retries=0)
def flusher(shard: int) -> bool:
    return pipeline.delivery_flusher_check(shard=shard)


@shared_task(
    name="counters.aggregate",
    queue="counters",
    acks_late=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    max_retries=5,
)
def aggregate(shard: int, trigger: str = "timer") -> dict:
    batches = pipeline.delivery_aggregate_shard(shard=shard, trigger=trigger)
    return {
        "shard": shard,
        "batches": len(batches),
        "events_in": sum(b.events_in for b in batches),
        "writes_out": sum(b.writes_out for b in batches),
    }


@shared_task(
    name="delivery.convert_conversation",
    queue="counters",
    acks_late=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError, django.db.OperationalError),
    retry_backoff=True,
    max_retries=8,
)
def convert_conversation(conversation_id: int, force: str | None = None) -> str | None:
    """Convert a group between aggregate and channel mode (see
    :func:`delivery.services.delivery_convert`); idempotent, so a redelivery after a crash
    resumes it."""
    return services.delivery_convert(conversation_id=conversation_id, force=force)


@shared_task(name="delivery.channel_badges", max_retries=0, expires=10)
def channel_badges() -> int:
    """Badge pushes for the members of channel-mode groups that had messages (Celery beat,
    every ``PUSH_INTERVAL_S``)."""
    return services.delivery_channel_badges()
