"""Writes of the offline app: what devices must learn goes into each user's offline store;
pulls, acks, device presence and the periodic trim.

Who gets what:
- a message: every active member, the sender included (its other devices learn what it
  sent; for the sender the entry also means "read up to here"). Written by the counter
  aggregation pipeline in the same batches as the counters (:func:`offline_record_messages`),
  so a storm costs one script call per member per flush, not per message;
- a mark-read: a ``read`` entry for the reader;
- a recall or an edit: a ``recall``/``edit`` entry for every active member of a small group
  (:func:`offline_record_message_ops`); channel-mode groups relay it to connected sockets;
- a join, leave or mute: a ``join``/``leave``/``mute`` entry for the member concerned (the
  state the devices keep is the user's own conversation list).
"""

import contextlib
import json
import logging
import time
from datetime import UTC, datetime, timedelta

import kombu.exceptions
import redis
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Min
from django.utils import timezone

from counters.redis import STORE_ERRORS
from imcore.errors import BadRequest
from imcore.models import Conversation, Device, Membership

from . import selectors, store
from .live import live_channel_message, live_channel_op, live_channels_changed, live_logout
from .store import Op, SinceAhead

logger = logging.getLogger(__name__)

ACK_WRITE_CHUNK = 5000


# ---- recording -----------------------------------------------------------------------------


def offline_record_messages(items) -> dict[int, tuple[int, int]]:
    """``items`` = ``[(user_id, [(conversation_id, top seq, read seq)])]``: every message up
    to ``top`` the user's log has not recorded yet gets an entry (idempotent)."""
    return store.append_messages(items)


def offline_channel_message(*, conversation_id: int, seq: int) -> None:
    """A message in a channel-mode group: no entry in any member's store (their devices learn
    it from ``/sync``'s ``channels`` and the history call); the members' connected devices
    get it live (:func:`offline.live.live_channel_message`)."""
    live_channel_message(conversation_id=conversation_id, seq=seq)


def offline_record_message_ops(
    *, user_ids: list[int], conversation_id: int, seq: int, op: str, edit_count: int = 0
) -> None:
    """A recall (``op="recall"``) or an edit (``"edit"``) of message ``seq``: an entry in each
    user's store (a small group's active members, the actor too: its other devices learn it),
    connected devices poked. The entry shows the message as it is when read."""
    typ = "d" if op == "recall" else "e"
    arg = str(seq) if typ == "d" else f"{seq}:{edit_count}"
    store.append_ops([(uid, [Op(typ, conversation_id, seq, 0, arg)]) for uid in user_ids])


def offline_channel_op(*, conversation_id: int, seq: int, op: str) -> None:
    """A recall or an edit in a channel-mode group: no entry per member (devices learn it from
    the history call, and ``/sync``'s ``channels`` item moved for a recall); the connected
    devices get it live (:func:`offline.live.live_channel_op`)."""
    live_channel_op(conversation_id=conversation_id, seq=seq, op=op)


def offline_record_read(*, user_id: int, conversation_id: int, seq: int, pipe=None):
    """Record a read for the user's other devices. With ``pipe`` it is queued there and the
    function that finishes it from its reply is returned (:func:`store.append_ops`)."""
    return store.append_ops([(user_id, [Op("r", conversation_id, seq, seq, str(seq))])], pipe=pipe)


def offline_version_queue(pipe, *, user_id: int) -> None:
    """Queue the read of the user's current version (what a badge read after it carries) on a
    caller's pipeline; give its reply to :func:`offline_version_done`."""
    store.version_read(pipe, user_id)


def offline_version_done(reply, *, user_id: int) -> int | None:
    """The version :func:`offline_version_queue` read; None when Redis did not hold the user's
    sync state: then the caller loads it (:func:`offline.selectors.badge_version`) and reads
    the badge again after it."""
    return store.version_held(reply, user_id)


def offline_record_memberships(
    *,
    memberships: list[Membership],
    conversation: Conversation,
    last_seq: int,
    change: str,
    joined: set[int] | None = None,
) -> None:
    """Record joins (``change="join"``), leaves or mutes of one conversation's members. The
    membership ``rev`` is the watermark, so repeating a call records nothing new. For a join,
    ``joined`` names the users who joined in this call (default: all): only their message
    watermark starts at ``last_seq``; a member whose state is only re-sent keeps recording
    the messages still queued for it."""
    ops = []
    for m in memberships:
        if change == "join" and m.left_at is None:
            arg = json.dumps(
                {
                    "kind": conversation.kind,
                    "title": conversation.title,
                    "last_seq": last_seq,
                    "read_seq": m.last_read_seq,
                    "muted": m.muted,
                },
                separators=(",", ":"),
            )
            start = last_seq if joined is None or m.user_id in joined else -1
            ops.append((m.user_id, [Op("j", m.conversation_id, m.rev, start, arg)]))
        elif change == "leave" and m.left_at is not None:
            ops.append((m.user_id, [Op("l", m.conversation_id, m.rev)]))
        elif change == "mute" and m.left_at is None:
            ops.append((m.user_id, [Op("u", m.conversation_id, m.rev, 0, "1" if m.muted else "0")]))
    if ops:
        store.append_ops(ops)
    if change in ("join", "leave") and conversation.mode in Conversation.CHANNEL_FORM_MODES:
        _channels_changed([m.user_id for m in memberships])


def offline_channel_members_changed(
    *, user_ids: list[int], conversation_id: int, channel: bool
) -> None:
    """A group's members' counters moved to channel form (``channel``) or back (the conversion,
    per chunk, after their counters): their connected sockets start or stop relaying the
    group's messages. Costs one event per member with a device online."""
    _channels_changed(user_ids)


def _channels_changed(user_ids: list[int]) -> None:
    try:
        online = store.presence_online(user_ids)
    except STORE_ERRORS:
        logger.warning("could not read presence; telling every member", exc_info=True)
        online = {uid: {0} for uid in user_ids}
    users = [uid for uid, devices in online.items() if devices]
    if users:
        live_channels_changed(users)


# ---- devices -------------------------------------------------------------------------------


def offline_device_seen(*, device: Device, prepare: bool = True) -> bool:
    """Note that the device is here. Kept in Redis and written to ``last_seen_at`` by the
    next ack flush, so presence costs no database write per request. A device that was away
    longer than ``SYNC_AWAY_AFTER_S`` (or never seen) came back: its offline package is
    prepared by a task, so the pages it pulls next are cheap reads. Returns whether it came
    back."""
    now, away = timezone.now(), timedelta(seconds=settings.SYNC_AWAY_AFTER_S)
    pending = _from_ms(store.seen_touch(device_pk=device.pk))
    if pending is not None and now - pending <= away:
        return False  # seen lately: PostgreSQL's last-seen time is not needed
    seen = (selectors.device_field(device, "last_seen_at"), pending)
    last = max((t for t in seen if t is not None), default=None)
    came_back = last is None or now - last > away
    if came_back and prepare:
        offline_request_prepare(device_pk=device.pk)
    return came_back


def offline_devices_logged_out(*, user_id: int, device_pks: list[int]) -> None:
    """These devices of the user were logged out (their rows are deleted and committed): Redis
    forgets them (presence, scheduled push, pending acks, prepared packages) and their open
    WebSockets close with 4401."""
    if not device_pks:
        return
    try:
        store.devices_forget(user_id=user_id, device_pks=device_pks)
    except STORE_ERRORS:
        # The logout stands (the rows are gone): presence expires within PRESENCE_TTL_S and a
        # scheduled push finds no device; what is left in Redis does no harm.
        logger.warning("could not forget logged-out devices %s in Redis", device_pks, exc_info=True)
    live_logout(user_id=user_id, device_pks=device_pks)


def _from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def offline_request_prepare(*, device_pk: int) -> None:
    """Send ``offline.prepare_device`` once the current transaction (if any) commits."""
    transaction.on_commit(lambda: _send_prepare(device_pk))


def _send_prepare(device_pk: int) -> None:
    from .tasks import prepare_device

    try:
        prepare_device.delay(device_pk=device_pk)
    except kombu.exceptions.OperationalError:
        # The broker is down: the device's pulls read the store directly, just less cheaply.
        logger.warning("could not send prepare_device for device %s", device_pk, exc_info=True)


def offline_prepare_device(*, device_pk: int) -> str:
    """Build a device's offline package: everything after its acked version, with message
    bodies read now (or, if it is behind the store, the gap snapshot), kept in Redis for
    ``SYNC_PACKAGE_TTL_S``. Returns what was prepared: "package", "snapshot" or "none"."""
    device = Device.objects.filter(pk=device_pk).first()
    if device is None:
        return "none"
    since = selectors.device_acked_version(device)
    page = store.read_page(
        user_id=device.user_id, device_pk=device.pk, since=since, limit=settings.OFFLINE_MAX_ENTRIES
    )
    ttl = settings.SYNC_PACKAGE_TTL_S
    if page.status == "gap":
        snapshot = selectors.sync_snapshot(user_id=device.user_id, latest_version=page.latest)
        store.store_snapshot(
            user_id=device.user_id, device_pk=device.pk, snapshot=snapshot, ttl_s=ttl
        )
        return "snapshot"
    messages = [e for e in page.entries if e.type == "m"]
    store.store_package(
        user_id=device.user_id,
        device_pk=device.pk,
        entries=selectors.entries_out(messages),
        ttl_s=ttl,
    )
    return "package"


# ---- presence -------------------------------------------------------------------------------


def presence_connected(*, device: Device) -> None:
    """A device's WebSocket is open (or sent a frame): online for ``PRESENCE_TTL_S`` more."""
    store.presence_touch(user_id=device.user_id, device_pk=device.pk, ttl_s=settings.PRESENCE_TTL_S)
    offline_device_seen(device=device, prepare=False)


def presence_disconnected(*, device: Device) -> None:
    store.presence_leave(user_id=device.user_id, device_pk=device.pk)


# ---- pull and ack --------------------------------------------------------------------------


def sync_pull(*, device: Device, since: int, limit: int) -> dict:
    """``GET /sync``: one page (see :func:`sync_page`), and the device is seen."""
    page = sync_page(device=device, since=since, limit=limit)
    offline_device_seen(device=device)
    return page


def sync_page(*, device: Device, since: int, limit: int) -> dict:
    """Entries after ``since`` in version order (at most ``limit``), or, when ``since`` is
    behind what the store holds, ``gap: true`` and a snapshot of every conversation from
    PostgreSQL with the version to continue from. Every answer carries the badge with its
    version (``badge``, ``badge_version``: the latest version, read before the badge), and
    ``channels``: the
    user's channel-mode groups that changed since the device's ``since`` (all of them with a
    gap, or when the store no longer holds the entry at ``since``; see
    :func:`offline.selectors.sync_channels`)."""
    page, since_ms = _page(device=device, since=since, limit=limit)
    fields = page.pop("_counters")
    page["channels"] = selectors.sync_channels(
        user_id=device.user_id, after_ms=since_ms, fields=fields
    )
    # The badge from the counter hash read in the page's round trip, after its version.
    page["badge"] = selectors.sync_badge(device.user_id, fields)
    page["badge_version"] = page["latest_version"]
    return page


def _page(*, device: Device, since: int, limit: int) -> tuple[dict, int | None]:
    """One page without ``channels`` (the user's counter hash is under ``_counters``, read in
    the same round trip), and the time of the entry at ``since`` (None: a gap, or not held)."""
    try:
        page = store.read_page(
            user_id=device.user_id, device_pk=device.pk, since=since, limit=limit, counters=True
        )
    except SinceAhead as exc:
        raise BadRequest(
            f"since {since} is ahead of the latest version {exc.latest}",
            details={"latest_version": exc.latest},
        ) from exc
    if page.status == "gap":
        # A prepared snapshot is used only while it is current: one built before the latest
        # version would answer an older ``latest_version`` with ``has_more: false``, and a
        # client that follows the protocol would stop there, missing what came after it.
        # (Its channel-mode groups may be older than that: ``channels`` lists them all.)
        snapshot = page.snapshot
        if snapshot is None or snapshot["latest_version"] != page.latest:
            snapshot = selectors.sync_snapshot(user_id=device.user_id, latest_version=page.latest)
        snapshot.setdefault("badge_version", snapshot["latest_version"])  # (prepared before)
        return {
            "entries": [],
            "latest_version": snapshot["latest_version"],
            "has_more": False,
            "gap": True,
            "snapshot": snapshot,
            "_counters": page.counters,
        }, None
    return {
        "entries": selectors.entries_out(page.entries[:limit], page.package),
        "latest_version": page.latest,
        "has_more": len(page.entries) > limit,
        "gap": False,
        "_counters": page.counters,
    }, page.since_ms


def sync_catch_up(
    *, device: Device, since: int | None, channels_ms: int | None = None, channels: bool = False
) -> tuple[list[dict], int, int | None]:
    """What a connected device has not been sent yet: pages (or a snapshot) from ``since``
    (its acked version when None) up to the latest version, in frames of
    ``SYNC_WS_FRAME_ENTRIES``. The last frame carries ``channels``, the channel-mode groups
    that changed since ``channels_ms`` (the socket's previous listing; None: since the time of
    the entry at ``since``, as ``/sync`` does). They are listed whenever frames go out (so a
    device that acks what it got knows every group as of then, as after ``/sync``) or when
    ``channels`` asks (on connect and on the periodic refresh, which mend a lost relay); a
    frame with no entries carries them alone. Returns the frames, the version the last one
    reached and the time of this listing (for the next call; ``channels_ms`` unchanged when
    none was made). The last frame carries the badge too, with its version (``badge``,
    ``badge_version``)."""
    if since is None:
        since = selectors.device_acked_version(device)
    frames = []
    after_ms = channels_ms
    first = True
    while True:
        page, since_ms = _page(device=device, since=since, limit=settings.SYNC_WS_FRAME_ENTRIES)
        fields = page.pop("_counters")
        if first and channels_ms is None:
            after_ms = since_ms
        if page["gap"]:
            after_ms = None
        first = False
        if page["gap"] or page["entries"]:
            frames.append({"type": "sync", **page})
        since = (
            page["latest_version"]
            if page["gap"]
            else (page["entries"][-1]["version"] if page["entries"] else since)
        )
        if not page["has_more"]:
            break
    if not frames and not channels:
        return frames, since, channels_ms
    now_ms = int(time.time() * 1000)  # before the read: a later change is listed next time
    listed = selectors.sync_channels(user_id=device.user_id, after_ms=after_ms, fields=fields)
    badge = {
        "badge": selectors.sync_badge(device.user_id, fields),
        "badge_version": page["latest_version"],
    }
    if frames:
        frames[-1]["channels"] = listed
        frames[-1].update(badge)
    elif listed:
        frames.append(
            {
                "type": "sync",
                "entries": [],
                "latest_version": page["latest_version"],
                "has_more": False,
                "gap": False,
                "channels": listed,
                **badge,
            }
        )
    return frames, since, now_ms


def sync_ack(*, device: Device, version: int) -> int:
    """Cumulative ack: the device has everything up to ``version``. Never moves back (an older
    ack is ignored). Absorbed in Redis and written to PostgreSQL in batches by
    ``offline.flush_acks`` (every ``SYNC_ACK_FLUSH_INTERVAL_S``, or at once when
    ``SYNC_ACK_FLUSH_THRESHOLD`` devices have acks waiting). Returns the device's ack now."""
    try:
        store.read_page(user_id=device.user_id, device_pk=device.pk, since=version, limit=0)
    except SinceAhead as exc:
        raise BadRequest(
            f"version {version} is ahead of the latest version {exc.latest}",
            details={"latest_version": exc.latest},
        ) from exc
    offline_device_seen(device=device, prepare=False)
    highest, flush = store.ack_absorb(device_pk=device.pk, version=version)
    if flush:
        from .tasks import flush_acks

        try:
            flush_acks.delay()
        except kombu.exceptions.OperationalError:
            logger.warning(
                "could not send flush_acks; the periodic flush takes them", exc_info=True
            )
    return max(highest, selectors.device_acked_version(device))


def offline_flush_acks() -> int:
    """Write the absorbed acks and last-seen times to PostgreSQL: one UPDATE each per
    ``ACK_WRITE_CHUNK`` devices, never moving an ack or a last-seen time back. Returns the
    number of devices whose ack was written."""
    lock = store.flush_lock()
    if not lock.acquire(blocking=False):
        return 0  # another flusher is writing; what waits goes with the next flush
    try:
        acks, seen = store.acks_take()
        table = Device._meta.db_table
        with transaction.atomic(), connection.cursor() as cursor:
            for chunk in _chunks(sorted(acks)):
                cursor.execute(
                    f"UPDATE {table} AS d SET acked_version = GREATEST(d.acked_version, a.v) "
                    "FROM unnest(%s::bigint[], %s::bigint[]) AS a(id, v) WHERE d.id = a.id",
                    [chunk, [acks[pk] for pk in chunk]],
                )
            for chunk in _chunks(sorted(seen)):
                cursor.execute(
                    f"UPDATE {table} AS d SET last_seen_at = "
                    "GREATEST(d.last_seen_at, to_timestamp(a.ms / 1000.0)) "
                    "FROM unnest(%s::bigint[], %s::bigint[]) AS a(id, ms) WHERE d.id = a.id",
                    [chunk, [seen[pk] for pk in chunk]],
                )
        store.acks_done()
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()
    return len(acks)


def _chunks(pks: list[int]):
    for start in range(0, len(pks), ACK_WRITE_CHUNK):
        yield pks[start : start + ACK_WRITE_CHUNK]


# ---- retention -----------------------------------------------------------------------------


def offline_trim() -> tuple[int, int]:
    """The periodic trim: drop entries past ``OFFLINE_RETENTION_S``, and entries every device
    of the user has acknowledged (a device that logs in later starts with the gap snapshot,
    so it never needs them). Returns ``(users looked at, entries dropped)``."""
    users = dropped = 0
    for batch in store.log_users():
        users += len(batch)
        acked_by_all = dict(
            Device.objects.filter(user_id__in=batch)
            .values("user_id")
            .annotate(low=Min("acked_version"))
            .values_list("user_id", "low")
        )
        dropped += store.trim_users(acked_by_all, batch)
    logger.info("offline trim: %s users, %s entries dropped", users, dropped)
    return users, dropped
