"""The offline store and the version service, on Redis with Lua (layout in :mod:`.keys`).

Versions follow WeChat's seqsvr: Redis hands them out (one script call per user, atomic with
the entry it numbers), but never above an upper bound stored in PostgreSQL
(``offline_versionbound``), which is raised in steps of ``OFFLINE_VERSION_STEP`` before it is
used. PostgreSQL is written once per step per user, not once per version. When Redis loses a
user's hash, or restarts (its ``run_id`` changes, so even a restore from an older snapshot is
caught), the user is reloaded: PostgreSQL's bound is raised by a step and versions continue
above the old bound, so none goes backwards or repeats.

Every write is idempotent through watermarks in the user's hash (message seq, read seq,
membership rev), so at-least-once callers (the aggregation pipeline, a client's retry) record
each change once.

The writers batch: one script call per user, pipelined ``PIPELINE_CHUNK`` at a time, and the
PostgreSQL reads and writes of reloading and raising bounds are one statement per batch.
"""

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import redis
from django.conf import settings
from django.db import connection, transaction
from redis.commands.core import Script

from counters import keys as counter_keys
from counters.redis import execute, get_redis, register_script, run_ids, run_script
from imcore.models import Membership

from . import keys
from .models import VersionBound

LUA_DIR = Path(__file__).with_name("lua")
PIPELINE_CHUNK = 1000
# A write retries after reloading or raising bounds; more than this many rounds means something
# keeps wiping Redis under it.
MAX_ROUNDS = 6


class SyncUnavailable(Exception):
    """The store could not hand out versions (Redis kept losing the user's state)."""


class SinceAhead(Exception):
    """A pull or ack names a version the user has not reached."""

    def __init__(self, latest: int):
        super().__init__(latest)
        self.latest = latest


@dataclass(frozen=True)
class Op:
    """A non-message entry: ``r`` read, ``j`` join, ``l`` leave, ``u`` mute, ``d`` recall,
    ``e`` edit. ``watermark`` is the read seq (``r``), the membership rev, or the message's
    seq (``d``, ``e``: not a watermark, each call writes its entry); ``seq`` is the
    conversation's last_seq for a join; ``arg`` is stored as given."""

    type: str
    conversation_id: int
    watermark: int
    seq: int = 0
    arg: str = ""


class Entry(NamedTuple):
    """One entry of the log as stored. A tuple: a page parses up to a few hundred of them, and
    a frozen dataclass's ``__init__`` (a ``__setattr__`` per field) took 4 % of a pull."""

    version: int
    at_ms: int
    type: str
    conversation_id: int
    arg: str

    @classmethod
    def parse(cls, member: str) -> "Entry":
        version, at_ms, typ, cid, arg = member.split("|", 4)
        return cls(int(version), int(at_ms), typ, int(cid), arg)


@dataclass(frozen=True)
class Page:
    """What one read of the store found."""

    status: str  # "entries" or "gap"
    latest: int
    floor: int
    entries: list[Entry]
    package: dict[int, dict]  # version -> prepared entry JSON (message entries)
    snapshot: dict | None = None
    since_ms: int | None = None  # when the entry at ``since`` was written (None: not held)
    counters: dict[str, str] | None = None  # the user's counter hash, when asked for


@cache
def _source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


class _Scripts:
    def __init__(self, client: redis.Redis):
        for name in (
            "append",
            "init",
            "bound",
            "read",
            "trim",
            "ack",
            "ackpop",
            "seen",
            "push_schedule",
            "push_take",
        ):
            setattr(self, name, register_script(client, _source(name)))

    append: Script
    init: Script
    bound: Script
    read: Script
    trim: Script
    ack: Script
    ackpop: Script
    seen: Script
    push_schedule: Script
    push_take: Script


@cache
def _scripts_for(client: redis.Redis) -> _Scripts:
    return _Scripts(client)


def client() -> redis.Redis:
    return get_redis()


def scripts() -> _Scripts:
    return _scripts_for(client())


def redis_run_ids(user_ids: Iterable[int]) -> dict[int, str]:
    """The run_id of the Redis process holding each user's keys: it changes on every restart
    (and, on a cluster, when a replica takes over a master's slots), so a user's hash loaded
    under another run_id may come from an older snapshot or a replica that missed writes, and
    is reloaded. One INFO per Redis process involved."""
    user_ids = list(user_ids)
    return dict(zip(user_ids, run_ids([keys.state(u) for u in user_ids]), strict=True))


def _ttl_ms() -> int:
    return int(settings.OFFLINE_RETENTION_S * 1000)


# ---- writes --------------------------------------------------------------------------------


def append_messages(items: Sequence[tuple[int, Sequence[tuple[int, int, int]]]]):
    """Record messages: ``items`` = ``[(user_id, [(conversation_id, top seq, read seq)])]``;
    every seq above what the user's log has for the conversation, up to top, gets an entry.
    Returns ``{user_id: (first version, last version)}`` of what was new."""
    return _append("m", {uid: [v for triple in triples for v in triple] for uid, triples in items})


def append_ops(items: Sequence[tuple[int, Sequence[Op]]], *, pipe=None):
    """Record operations (reads, joins, leaves, mutes) for users; same return as
    :func:`append_messages`. With ``pipe`` (no MULTI) the script calls are queued on it, one
    per user, and a function is returned: given their replies, in order, it finishes (a user
    whose state Redis did not hold is loaded and appended to again) and returns that."""
    args_by_user = {
        uid: [v for op in ops for v in (op.type, op.conversation_id, op.watermark, op.seq, op.arg)]
        for uid, ops in items
    }
    if pipe is None:
        return _append("o", args_by_user)
    rids = redis_run_ids(args_by_user)
    for keys_, args in _append_calls("o", args_by_user, rids):
        run_script(scripts().append, keys=keys_, args=args, client=pipe)
    return lambda replies: _append("o", args_by_user, sent=(rids, replies))


def _append_calls(mode: str, todo: dict[int, list], rids: dict[int, str]) -> list:
    head = [settings.OFFLINE_MAX_ENTRIES, _ttl_ms(), mode]
    return [
        ([keys.state(uid), keys.log(uid), keys.online(uid)], [rids[uid], *head, *args])
        for uid, args in todo.items()
    ]


def _append(
    mode: str, args_by_user: dict[int, list], sent: tuple[dict, list] | None = None
) -> dict[int, tuple[int, int]]:
    """Append the entries, in rounds until every user's went in; ``sent``: the run ids and
    the replies of a first round the caller sent (:func:`append_ops` with a pipeline)."""
    written: dict[int, tuple[int, int]] = {}
    online: list[int] = []  # users with new entries and a device connected
    todo = args_by_user
    for _ in range(MAX_ROUNDS):
        if not todo:
            if online:
                from .live import live_poke

                live_poke(online)
            return written
        if sent is not None:
            (rids, results), sent = sent, None
        else:
            rids = redis_run_ids(todo)
            results = _pipelined(scripts().append, _append_calls(mode, todo, rids))
        reload: list[int] = []
        need: dict[int, int] = {}
        for uid, result in zip(todo, results, strict=True):
            if result[0] == 1:
                written[uid] = (int(result[1]), int(result[2]))
                if len(result) > 3 and int(result[3]) > 0:
                    online.append(uid)
            elif result[0] == -1:
                reload.append(uid)
            else:
                need[uid] = int(result[1])
        if reload:
            load_users(reload, rids=rids)
        if need:
            raise_bounds(need, rids=rids)
        todo = {uid: todo[uid] for uid in [*reload, *need]}
    raise SyncUnavailable(f"versions for {len(todo)} users could not be handed out")


def _pipelined(script: Script, calls: list[tuple[list[str], list]]) -> list:
    out: list = []
    for start in range(0, len(calls), PIPELINE_CHUNK):
        pipe = client().pipeline(transaction=False)
        for keys_, args in calls[start : start + PIPELINE_CHUNK]:
            run_script(script, keys=keys_, args=args, client=pipe)
        out.extend(execute(pipe))
    return out


def _upsert_bounds(sql_set: str, values: dict[int, int]) -> dict[int, tuple[int, bool]]:
    """One statement for all users, rows locked in user order (no deadlock between two
    batches); durable before any version under the new bound is handed out (callers are not
    inside a transaction: the pipeline, request paths after their commit). Returns
    ``{user_id: (bound, whether the row is new)}``."""
    table = VersionBound._meta.db_table
    uids = sorted(values)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (user_id, bound) "
            "SELECT u, b FROM unnest(%s::bigint[], %s::bigint[]) AS t(u, b) ORDER BY u "
            f"ON CONFLICT (user_id) DO UPDATE SET bound = {sql_set} "
            "RETURNING user_id, bound, xmax = 0",
            [uids, [values[u] for u in uids]],
        )
        return {uid: (bound, inserted) for uid, bound, inserted in cursor.fetchall()}


def raise_bounds(need: dict[int, int], *, rids: dict[int, str]) -> None:
    """Store bounds at least a step above what each user needs, then let Redis use them."""
    step = settings.OFFLINE_VERSION_STEP
    stored = _upsert_bounds(
        f"GREATEST({VersionBound._meta.db_table}.bound, EXCLUDED.bound)",
        {uid: n + step for uid, n in need.items()},
    )
    _pipelined(
        scripts().bound,
        [([keys.state(uid)], [rids[uid], bound]) for uid, (bound, _) in stored.items()],
    )


def load_users(user_ids: Iterable[int], *, rids: dict[int, str]) -> None:
    """(Re)load users whose hash Redis lost or loaded under another run_id. Their bound moves a
    step up first; versions continue just above the old bound, and that first version stays
    unused: it becomes the floor, so every device that synced before gets the gap snapshot
    (what the lost hash held is gone). A user new to the store starts the same way at 1, so
    its devices start with the snapshot of what already exists."""
    user_ids = sorted(set(user_ids))
    step = settings.OFFLINE_VERSION_STEP
    table = VersionBound._meta.db_table
    bounds = _upsert_bounds(f"{table}.bound + EXCLUDED.bound", dict.fromkeys(user_ids, step))
    # Watermarks start at what PostgreSQL holds now: the snapshot the devices get covers
    # everything before (a user new to the store, too: its devices start with the snapshot).
    rows: dict[int, list] = {uid: [] for uid in user_ids}
    for uid, cid, last_seq, read_seq, rev in Membership.objects.filter(
        user_id__in=user_ids, left_at__isnull=True
    ).values_list("user_id", "conversation_id", "conversation__last_seq", "last_read_seq", "rev"):
        rows[uid] += [cid, last_seq, read_seq, rev]
    ttl = _ttl_ms()
    calls = []
    for uid in user_ids:
        bound, _ = bounds[uid]
        cur = bound - step + 1  # above the old bound: above every version handed out
        calls.append(([keys.state(uid), keys.log(uid)], [rids[uid], cur, bound, ttl, *rows[uid]]))
    _pipelined(scripts().init, calls)


# ---- reads ---------------------------------------------------------------------------------


def read_page(
    *, user_id: int, device_pk: int, since: int, limit: int, counters: bool = False
) -> Page:
    """Entries with version > ``since``, at most ``limit`` + 1 (the caller tells ``has_more``
    from the extra one), or the gap verdict when ``since`` is below what the store holds.
    Raises :class:`SinceAhead` when ``since`` is beyond the latest version. With
    ``counters``, the user's counter hash comes in the same round trip (same slot)."""
    for _ in range(MAX_ROUNDS):
        rid = redis_run_ids([user_id])[user_id]
        pipe = client().pipeline(transaction=False)
        run_script(
            scripts().read,
            keys=[
                keys.state(user_id),
                keys.log(user_id),
                keys.package(user_id, device_pk),
                keys.snapshot(user_id, device_pk),
            ],
            args=[rid, since, limit],
            client=pipe,
        )
        if counters:
            pipe.hgetall(counter_keys.counters(user_id))
        replies = execute(pipe)
        result = replies[0]
        fields = replies[1] if counters else None
        status = int(result[0])
        if status == -1:
            load_users([user_id], rids={user_id: rid})
            continue
        if status == -3:
            raise SinceAhead(int(result[1]))
        latest, floor = int(result[1]), int(result[2])
        if status == 0:
            snapshot = json.loads(result[3]) if result[3] else None
            return Page("gap", latest, floor, [], {}, snapshot, counters=fields)
        package = {}
        for raw in result[4]:
            entry = json.loads(raw)
            package[entry["version"]] = entry
        at = Entry.parse(result[5]).at_ms if result[5] else None
        return Page(
            "entries",
            latest,
            floor,
            [Entry.parse(m) for m in result[3]],
            package,
            since_ms=at,
            counters=fields,
        )
    raise SyncUnavailable(f"the sync state of user {user_id} could not be loaded")


def latest_version(user_id: int) -> int:
    """VERSION-LATEST of a user (loads the user when Redis does not hold it)."""
    return read_page(user_id=user_id, device_pk=0, since=0, limit=0).latest


def current_version(user_id: int) -> int:
    """VERSION-LATEST of a user in one HMGET when Redis holds the user's sync state (else as
    :func:`latest_version`, which loads it): the version a badge read next carries."""
    version = version_held(version_read(client(), user_id), user_id)
    return latest_version(user_id) if version is None else version


def version_and_counters(user_id: int) -> tuple[int, dict]:
    """:func:`current_version` and then the user's counter hash, in one round trip (same
    slot): the hash is read after the version, so the badge in it reflects every change up to
    that version."""
    pipe = client().pipeline(transaction=False)
    version_read(pipe, user_id)
    pipe.hgetall(counter_keys.counters(user_id))
    held, fields = pipe.execute()
    if (version := version_held(held, user_id)) is not None:
        return version, fields
    version = latest_version(user_id)  # loaded now, after the hash was read: read it again
    return version, client().hgetall(counter_keys.counters(user_id))


def version_read(target, user_id: int):
    """The read of the user's current version (one HMGET) on a client, or queued on a
    caller's pipeline; its reply goes to :func:`version_held`."""
    return target.hmget(keys.state(user_id), "rid", "cur")


def version_held(reply, user_id: int) -> int | None:
    """The version :func:`version_read` read; None when this Redis does not hold the user's
    sync state (then :func:`latest_version` loads it)."""
    rid, cur = reply
    if cur is not None and rid == redis_run_ids([user_id])[user_id]:
        return int(cur)
    return None


def peek_latest(user_ids: Iterable[int]) -> dict[int, int | None]:
    """Latest versions as Redis holds them now, without loading (admin); None = not loaded."""
    user_ids = list(user_ids)
    pipe = client().pipeline(transaction=False)
    for uid in user_ids:
        pipe.hget(keys.state(uid), "cur")
    return {
        uid: int(v) if v is not None else None
        for uid, v in zip(user_ids, pipe.execute(), strict=True)
    }


def store_package(*, user_id: int, device_pk: int, entries: list[dict], ttl_s: int) -> None:
    key = keys.package(user_id, device_pk)
    pipe = client().pipeline(transaction=True)
    pipe.delete(key)
    if entries:
        pipe.zadd(key, {json.dumps(e, separators=(",", ":")): e["version"] for e in entries})
        pipe.expire(key, ttl_s)
    pipe.execute()


def store_snapshot(*, user_id: int, device_pk: int, snapshot: dict, ttl_s: int) -> None:
    client().set(
        keys.snapshot(user_id, device_pk), json.dumps(snapshot, separators=(",", ":")), ex=ttl_s
    )


# ---- presence -----------------------------------------------------------------------------


def presence_touch(*, user_id: int, device_pk: int, ttl_s: float) -> None:
    """The device is connected: online until now + ``ttl_s`` unless touched again."""
    now_ms = int(time.time() * 1000)
    key = keys.online(user_id)
    pipe = client().pipeline(transaction=True)
    pipe.zremrangebyscore(key, "-inf", now_ms)
    pipe.zadd(key, {str(device_pk): now_ms + int(ttl_s * 1000)})
    pipe.pexpire(key, int(ttl_s * 1000) + 1000)
    pipe.execute()


def presence_leave(*, user_id: int, device_pk: int) -> None:
    client().zrem(keys.online(user_id), str(device_pk))


def presence_online(user_ids: Iterable[int]) -> dict[int, set[int]]:
    """``{user_id: {device pks online}}``, one round trip per 1,000 users."""
    user_ids = list(user_ids)
    now_ms = int(time.time() * 1000)
    out: dict[int, set[int]] = {}
    for start in range(0, len(user_ids), PIPELINE_CHUNK):
        part = user_ids[start : start + PIPELINE_CHUNK]
        pipe = client().pipeline(transaction=False)
        for uid in part:
            pipe.zrangebyscore(keys.online(uid), now_ms, "+inf")
        for uid, members in zip(part, pipe.execute(), strict=True):
            out[uid] = {int(m) for m in members}
    return out


def devices_forget(*, user_id: int, device_pks: list[int]) -> None:
    """Forget everything Redis holds for these (logged-out) devices in one round trip:
    presence, a scheduled push, acks and last-seen times not flushed yet, prepared package and
    snapshot. A batch already in flight to PostgreSQL updates no row (the rows are gone)."""
    if not device_pks:
        return
    members = [str(int(pk)) for pk in device_pks]
    pipe = client().pipeline(transaction=False)
    pipe.zrem(keys.online(user_id), *members)
    pipe.zrem(keys.PUSH_DUE, *members)
    pipe.hdel(keys.PUSH_KIND, *members)
    pipe.hdel(keys.PUSH_LAST, *members)
    pipe.hdel(keys.ACKS_PENDING, *members)
    pipe.hdel(keys.SEEN_PENDING, *members)
    for pk in device_pks:
        pipe.delete(keys.package(user_id, pk))  # one key per DEL (cluster pipelines)
        pipe.delete(keys.snapshot(user_id, pk))
    pipe.execute()


# ---- push ---------------------------------------------------------------------------------

PUSH_KEYS = [keys.PUSH_DUE, keys.PUSH_KIND, keys.PUSH_LAST]


def push_schedule(devices: list[tuple[int, bool]], *, interval_s: float) -> None:
    """``devices`` = ``[(device pk, alert)]``."""
    args = [int(time.time() * 1000), int(interval_s * 1000)]
    for start in range(0, len(devices), PIPELINE_CHUNK):
        part = devices[start : start + PIPELINE_CHUNK]
        scripts().push_schedule(
            keys=PUSH_KEYS, args=args + [v for pk, alert in part for v in (pk, int(alert))]
        )


def push_take(limit: int = 1000) -> list[tuple[int, str]]:
    flat = scripts().push_take(keys=PUSH_KEYS, args=[int(time.time() * 1000), limit])
    return [(int(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]


def push_badges_sent(device_pks: Iterable[int]) -> dict[int, int]:
    """The badge each device's last push carried (absent: none sent yet)."""
    pks = list(device_pks)
    if not pks:
        return {}
    values = client().hmget(keys.PUSH_BADGE, pks)
    return {pk: int(v) for pk, v in zip(pks, values, strict=True) if v is not None}


def push_badges_note(badges: dict[int, int]) -> None:
    if badges:
        client().hset(keys.PUSH_BADGE, mapping=badges)


# ---- acks ----------------------------------------------------------------------------------


def ack_absorb(*, device_pk: int, version: int) -> tuple[int, bool]:
    """Keep a device's cumulative ack until the next flush; returns ``(highest pending ack of
    the device, whether a flush should be sent now)``."""
    highest, flush = scripts().ack(
        keys=[keys.ACKS_PENDING, keys.ACKS_FLUSH_FLAG],
        args=[
            device_pk,
            version,
            settings.SYNC_ACK_FLUSH_THRESHOLD,
            int(settings.SYNC_ACK_FLUSH_INTERVAL_S * 1000) + 1000,
        ],
    )
    return int(highest), bool(flush)


def acks_pending(device_pks: Iterable[int]) -> dict[int, int]:
    """Acks not yet written to PostgreSQL (pending or in flight), per device."""
    return _newest_waiting(keys.ACKS_PENDING, keys.ACKS_INFLIGHT, device_pks)


def _newest_waiting(pending_key: str, inflight_key: str, device_pks) -> dict[int, int]:
    """Per device, the higher of its pending and in-flight values (acks, last-seen times)."""
    device_pks = [int(pk) for pk in device_pks]
    if not device_pks:
        return {}
    pipe = client().pipeline(transaction=False)
    pipe.hmget(pending_key, device_pks)
    pipe.hmget(inflight_key, device_pks)
    pending, inflight = pipe.execute()
    out = {}
    for pk, a, b in zip(device_pks, pending, inflight, strict=True):
        values = [int(v) for v in (a, b) if v is not None]
        if values:
            out[pk] = max(values)
    return out


def flush_lock():
    """One ack flusher at a time (a second one would delete the first one's batch in flight);
    a flusher that dies frees it after 60 s."""
    return client().lock(keys.ACKS_FLUSH_LOCK, timeout=60)


def acks_take() -> tuple[dict[int, int], dict[int, int]]:
    """The batch to write: ``({device pk: acked version}, {device pk: last seen unix ms})``.
    A batch a dead flusher left in flight comes first."""
    pipe = client().pipeline(transaction=False)
    run_script(scripts().ackpop, keys=[keys.ACKS_PENDING, keys.ACKS_INFLIGHT], args=[], client=pipe)
    run_script(scripts().ackpop, keys=[keys.SEEN_PENDING, keys.SEEN_INFLIGHT], args=[], client=pipe)
    acks, seen = execute(pipe)
    return _pairs(acks), _pairs(seen)


def _pairs(flat: list) -> dict[int, int]:
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def acks_done() -> None:
    pipe = client().pipeline(transaction=False)
    # one key per DEL: a cluster pipeline takes no multi-key DEL (one slot or not)
    for key in (keys.ACKS_INFLIGHT, keys.SEEN_INFLIGHT, keys.ACKS_FLUSH_FLAG):
        pipe.delete(key)
    pipe.execute()


def seen_touch(*, device_pk: int) -> int | None:
    """Record that the device is here now; returns when it was last seen before, if that is
    not flushed to PostgreSQL yet (unix ms)."""
    old = scripts().seen(
        keys=[keys.SEEN_PENDING, keys.SEEN_INFLIGHT], args=[device_pk, int(time.time() * 1000)]
    )
    return int(old) if old else None


def seen_pending(device_pks: Iterable[int]) -> dict[int, int]:
    """Last-seen times not yet written to PostgreSQL (unix ms), per device."""
    return _newest_waiting(keys.SEEN_PENDING, keys.SEEN_INFLIGHT, device_pks)


# ---- retention -----------------------------------------------------------------------------


def log_users(count: int = 1000) -> Iterable[list[int]]:
    """Users that have a log, in batches (SCAN: no index key to keep up to date)."""
    batch: list[int] = []
    for key in client().scan_iter(match=keys.LOG_PATTERN, count=count, _type="zset"):
        batch.append(keys.user_of_log(key))
        if len(batch) >= count:
            yield batch
            batch = []
    if batch:
        yield batch


def trim_users(acked_by_all: dict[int, int], user_ids: list[int]) -> int:
    """Drop what is past the retention, or acknowledged by every device, for these users;
    returns how many entries went."""
    cutoff_ms = int((time.time() - settings.OFFLINE_RETENTION_S) * 1000)
    results = _pipelined(
        scripts().trim,
        [
            (
                [keys.state(uid), keys.log(uid)],
                [cutoff_ms, acked_by_all.get(uid, 0), settings.OFFLINE_MAX_ENTRIES],
            )
            for uid in user_ids
        ],
    )
    return sum(max(int(r), 0) for r in results)
