"""The aggregation pipeline of the delivery app: sharded durable queues, a Timer, a Flusher
and an Aggregator, so that a storm of messages in large groups becomes few writes to the sinks
(counters, sync entries, pushes).

- **Queues**: one Redis Stream per shard (``COUNTERS_SHARDS``). A message adds one event,
  ``(conversation id, seq)``, to shard ``conversation id % N``: one event per message, not per
  member, and a conversation's events fold together in one place. Events stay in the stream
  until an aggregator has applied and acknowledged them, so a worker restart loses nothing.
- **Flusher**: the enqueue script checks the shard's length in the same round trip; past
  ``COUNTERS_FLUSH_THRESHOLD`` it requests a flush (once, guarded by a flag) and the caller
  sends the ``counters.flusher`` task, which sends ``counters.aggregate`` for the shard.
- **Timer**: Celery beat runs ``counters.timer`` every ``COUNTERS_FLUSH_INTERVAL`` seconds; it
  reads every shard's length in one pipeline and requests an aggregate for each non-empty one.
- **Aggregator**: ``counters.aggregate`` takes the shard's lock (one aggregator per shard),
  first re-reads the events a dead predecessor left unacknowledged, then what is queued (more
  batches only while they come back full), folds them
  to the highest seq per conversation, reads the conversations' members in one query, applies
  one counter call per user with the configured strategy (pipelined for ``lua``), then
  acknowledges and deletes the events.

Exactly-once effect from at-least-once delivery: an event carries the message seq, and a
user's counters only move their top up to it, so an event applied twice (a kill between apply
and ack, two aggregators after a lock expired) changes nothing. The lock is for efficiency,
not correctness; Celery's own redelivery is never waited for, because the Timer re-requests
any shard that still holds events once its flag (``COUNTERS_SHARD_LOCK_TTL_MS``) has expired.

The same batches write the offline-store entries of the messages (every member, the sender
included; see :mod:`offline.services`): each user's new seqs per conversation go in one script
call beside the counter call, idempotent through the same seq watermark.

What a batch does once its events are read is :func:`delivery_apply_events`, shared with the
celery-batches write path (``DELIVERY_WRITE_PATH=batches``, ``counters.batch_message``), which
buffers one Celery task message per committed message in the worker instead of a stream.
"""

import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import kombu.exceptions
import redis
from django.conf import settings

from counters.redis import ScriptCall, get_redis, register_script, scripts_call
from counters.services import counters_count_messages
from imcore.models import Membership
from offline.push import push_badge_changed
from offline.services import offline_record_messages

from . import keys
from .failpoints import failpoint
from .mentions import Event, MentionIndex, event_from_fields, mention_event, stream_fields

logger = logging.getLogger(__name__)

LUA_DIR = Path(__file__).with_name("lua")


@dataclass
class FlushStats:
    """What one aggregator batch (or one celery-batches batch) did."""

    shard: int  # -1: a celery-batches batch (``DELIVERY_WRITE_PATH=batches``)
    trigger: str  # timer, flusher, continue, manual, test; batches
    events_in: int = 0  # queue events read (task messages for celery-batches)
    conversations: int = 0  # distinct conversations among them
    logical_updates: int = 0  # one per member per event: what per-message fan-out would write
    writes_out: int = 0  # (user, conversation) counter writes made
    users: int = 0  # counter calls made (one per user)
    batch_age_ms: int = 0  # how long the oldest event waited
    duration_ms: float = 0.0
    at: float = 0.0  # unix time the batch finished

    @property
    def ratio(self) -> float:
        """Logical updates per counter write (how much the batch folded)."""
        return self.logical_updates / self.writes_out if self.writes_out else 0.0


def shard_of(conversation_id: int) -> int:
    return int(conversation_id) % settings.COUNTERS_SHARDS


def _client() -> redis.Redis:
    return get_redis()


@cache
def _enqueue_script(client: redis.Redis):
    return register_script(client, (LUA_DIR / "enqueue.lua").read_text())


def delivery_enqueue(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int | None = None,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
) -> int:
    """Append the event of a committed message to its shard (with its mentions, if any; see
    :mod:`delivery.mentions`); when the shard passes the threshold, send the Flusher. Returns
    the shard."""
    call = enqueue_call(
        conversation_id=conversation_id,
        seq=seq,
        sender_id=sender_id,
        mentions=mentions,
        mention_all=mention_all,
    )
    return enqueued(conversation_id=conversation_id, flush=scripts_call([call])[0])


def enqueue_call(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int | None = None,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
) -> ScriptCall:
    """The enqueue script call of :func:`delivery_enqueue`, to be sent with other calls in one
    round trip (:func:`counters.redis.scripts_call`); give its reply to :func:`enqueued`."""
    shard = shard_of(conversation_id)
    return ScriptCall(
        _enqueue_script(_client()),
        [keys.shard_stream(shard), keys.shard_flush_flag(shard)],
        [
            conversation_id,
            seq,
            settings.COUNTERS_FLUSH_THRESHOLD,
            settings.COUNTERS_SHARD_LOCK_TTL_MS,
            *stream_fields(
                mention_event(
                    conversation_id,
                    seq,
                    sender_id=sender_id,
                    mentions=mentions,
                    mention_all=mention_all,
                )
            ),
        ],
    )


def enqueued(*, conversation_id: int, flush) -> int:
    """After the enqueue script ran: send the Flusher if it asked for one. Returns the
    shard."""
    shard = shard_of(conversation_id)
    if flush:
        from .tasks import flusher

        try:
            flusher.delay(shard=shard)
        except kombu.exceptions.OperationalError:
            # The broker is down: the event is stored; the Timer flushes it once it is back.
            # No flush is requested after all: clear the flag, or it would hold the Timer's
            # request back for COUNTERS_SHARD_LOCK_TTL_MS.
            _client().delete(keys.shard_flush_flag(shard))
            logger.warning("could not send the Flusher for shard %s", shard, exc_info=True)
    return shard


def shard_lengths() -> list[int]:
    """Events held by each shard (waiting or unacknowledged), in one round trip."""
    pipe = _client().pipeline(transaction=False)
    for shard in range(settings.COUNTERS_SHARDS):
        pipe.xlen(keys.shard_stream(shard))
    return [int(n) for n in pipe.execute()]


def delivery_request_aggregate(*, shard: int, trigger: str) -> bool:
    """Send ``counters.aggregate`` for the shard unless one is requested already."""
    if not _client().set(
        keys.shard_flush_flag(shard), 1, nx=True, px=settings.COUNTERS_SHARD_LOCK_TTL_MS
    ):
        return False
    from .tasks import aggregate

    try:
        aggregate.delay(shard=shard, trigger=trigger)
    except kombu.exceptions.OperationalError:
        _client().delete(keys.shard_flush_flag(shard))  # not requested after all
        raise
    return True


def delivery_timer_tick() -> list[int]:
    """The Timer: request an aggregate of every non-empty shard; returns those shards."""
    shards = [s for s, n in enumerate(shard_lengths()) if n]
    for shard in shards:
        delivery_request_aggregate(shard=shard, trigger="timer")
    return shards


def delivery_flusher_check(*, shard: int) -> bool:
    """The Flusher: the shard crossed the threshold (the enqueue that saw it set the shard's
    flag for this request); hand it to the Aggregator at once unless it drained meanwhile."""
    if _client().xlen(keys.shard_stream(shard)) == 0:
        _client().delete(keys.shard_flush_flag(shard))
        return False
    from .tasks import aggregate

    aggregate.delay(shard=shard, trigger="flusher")
    return True


def _ensure_group(client: redis.Redis, stream: str) -> None:
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
        client.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)


def _read(client: redis.Redis, stream: str, start: str) -> list:
    reply = client.xreadgroup(
        keys.GROUP, keys.CONSUMER, {stream: start}, count=settings.COUNTERS_BATCH_SIZE
    )
    return reply[0][1] if reply else []


def delivery_aggregate_shard(*, shard: int, trigger: str = "manual") -> list[FlushStats]:
    """The Aggregator: flush one shard, i.e. apply what it holds now (more batches only while
    they come back full, within ``COUNTERS_AGGREGATE_BUDGET_S``); returns the batches done.
    Does nothing when another aggregator holds the shard."""
    client = _client()
    lock = client.lock(keys.shard_lock(shard), timeout=settings.COUNTERS_SHARD_LOCK_TTL_MS / 1000)
    if not lock.acquire(blocking=False):
        # Another aggregator works the shard; it clears the flag when it lets go, so the next
        # Timer tick or Flusher asks again for what arrives after its last read.
        return []
    stream = keys.shard_stream(shard)
    done: list[FlushStats] = []
    deadline = time.monotonic() + settings.COUNTERS_AGGREGATE_BUDGET_S
    hand_over = False
    try:
        client.delete(keys.shard_flush_flag(shard))
        _ensure_group(client, stream)
        while True:
            # Events a dead aggregator read but never acknowledged come first.
            entries = _read(client, stream, "0")
            if gone := [eid for eid, fields in entries if not fields]:
                client.xack(stream, keys.GROUP, *gone)  # deleted already: nothing to apply
            entries = [(eid, fields) for eid, fields in entries if fields]
            if not entries:
                entries = _read(client, stream, ">")
            if not entries:
                break
            done.append(_apply_batch(client, lock, shard, trigger, stream, entries))
            if len(entries) < settings.COUNTERS_BATCH_SIZE:
                # What was queued is applied; newer events wait for the next Timer tick or
                # Flusher, so that each flush folds an interval's worth of messages.
                break
            if time.monotonic() > deadline:
                hand_over = True
                break
            lock.reacquire()
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()
        client.delete(keys.shard_flush_flag(shard))
    if hand_over:
        # The budget is spent: the rest goes to a continuation, requested only now that the
        # lock is free (requested earlier, it could find the lock still held and give up,
        # leaving the rest to the next Timer tick).
        delivery_request_aggregate(shard=shard, trigger="continue")
    return done


def _apply_batch(client, lock, shard: int, trigger: str, stream: str, entries) -> FlushStats:
    """Apply a batch of stream entries, then acknowledge and delete them (the Aggregator)."""
    ids = [eid for eid, _ in entries]

    def ack() -> None:
        failpoint("aggregate.before_ack")
        pipe = client.pipeline(transaction=True)
        pipe.xack(stream, keys.GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()

    return delivery_apply_events(
        [event_from_fields(fields) for _, fields in entries],
        shard=shard,
        trigger=trigger,
        oldest_ms=min(int(eid.split("-")[0]) for eid in ids),
        after_chunk=lock.reacquire,  # a batch for huge groups may outlast one lock TTL
        before_record=ack,
    )


def fold_events(events: Iterable[Event]) -> dict[int, int]:
    """The highest seq per conversation among increment events ``(conversation id, seq,
    ...)``."""
    top: dict[int, int] = {}
    for cid, seq, *_ in events:
        top[cid] = max(top.get(cid, 0), seq)
    return top


def delivery_apply_events(
    events: Sequence[Event],
    *,
    shard: int = -1,
    trigger: str = "batches",
    oldest_ms: int | None = None,
    after_chunk: Callable[[], object] | None = None,
    before_record: Callable[[], object] | None = None,
) -> FlushStats:
    """Apply a batch of increment events ``(conversation id, seq)``, in any order and with any
    duplicates: fold them to the highest seq per conversation, read those conversations'
    active members in one query, then for each user one counter call (``inc_many``: one
    script call per user, pipelined), one offline-store call and a push to the users whose
    badge went up, in chunks of ``COUNTERS_APPLY_CHUNK_USERS`` users; ``after_chunk`` runs
    after each chunk (the Aggregator renews its shard lock there), ``before_record`` after the
    last (the Aggregator acknowledges its stream entries there). Records the flush in the
    pipeline's metrics and returns it.

    The write of both the Aggregator (``shard`` >= 0) and the celery-batches task
    ``counters.batch_message`` (``shard`` -1): applying an event again changes nothing.
    Events of messages with mentions add, in the same counter call, the seqs that mention
    each user to that user's pairs (:class:`delivery.mentions.MentionIndex`)."""
    started = time.perf_counter()
    stats = FlushStats(shard=shard, trigger=trigger, events_in=len(events))
    top = fold_events(events)
    events_per_conversation: dict[int, int] = defaultdict(int)
    for cid, *_ in events:
        events_per_conversation[cid] += 1
    mentioned = MentionIndex(events)
    per_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
    read_seqs: dict[tuple[int, int], int] = {}
    for cid, uid, read_seq in Membership.objects.filter(
        conversation_id__in=list(top), left_at__isnull=True
    ).values_list("conversation_id", "user_id", "last_read_seq"):
        per_user[uid].append((cid, top[cid]))
        read_seqs[uid, cid] = read_seq
        stats.logical_updates += events_per_conversation[cid]
    items = list(per_user.items())
    failpoint("aggregate.after_read")

    def apply(part) -> None:
        # Counters, then the same users' offline-store entries (both idempotent), then a push
        # for the offline devices of users whose badge went up.
        deltas = counters_count_messages(
            [(uid, mentioned.counter_pairs(uid, pairs)) for uid, pairs in part]
            if mentioned
            else part
        )
        offline_record_messages(
            [(uid, [(cid, s, read_seqs[uid, cid]) for cid, s in pairs]) for uid, pairs in part]
        )
        push_badge_changed(
            user_ids=[uid for (uid, _), d in zip(part, deltas, strict=True) if d > 0], alert=True
        )

    half = len(items) // 2
    size = settings.COUNTERS_APPLY_CHUNK_USERS
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        if start <= half < start + size:
            apply(chunk[: half - start])
            failpoint("aggregate.mid_apply")
            apply(chunk[half - start :])
        else:
            apply(chunk)
        failpoint("aggregate.after_chunk")
        if after_chunk:
            after_chunk()
    if before_record:
        before_record()
    stats.conversations = len(top)
    stats.users = len(items)
    stats.writes_out = sum(len(pairs) for _, pairs in items)
    stats.at = time.time()
    if oldest_ms is not None:
        stats.batch_age_ms = max(int(stats.at * 1000) - oldest_ms, 0)
    stats.duration_ms = round((time.perf_counter() - started) * 1000, 3)
    _record(_client(), stats)
    return stats


def _record(client: redis.Redis, stats: FlushStats) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.lpush(keys.METRICS_FLUSHES, json.dumps({**asdict(stats), "ratio": stats.ratio}))
    pipe.ltrim(keys.METRICS_FLUSHES, 0, settings.COUNTERS_RECENT_FLUSHES - 1)
    for field in ("events_in", "logical_updates", "writes_out", "users"):
        pipe.hincrby(keys.METRICS_TOTALS, field, getattr(stats, field))
    pipe.hincrby(keys.METRICS_TOTALS, "flushes", 1)
    pipe.hincrbyfloat(keys.METRICS_TOTALS, "duration_seconds", stats.duration_ms / 1000)
    pipe.execute()


def delivery_drain(*, timeout: float = 30.0) -> int:
    """Aggregate every shard until all are empty (tests, benchmarks, admin); returns the
    number of events applied."""
    applied = 0
    deadline = time.monotonic() + timeout
    while any(shard_lengths()):
        for shard in range(settings.COUNTERS_SHARDS):
            applied += sum(s.events_in for s in delivery_aggregate_shard(shard=shard))
        if time.monotonic() > deadline:
            raise TimeoutError("the counter queues did not drain")
    return applied
