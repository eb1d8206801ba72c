"""Reads of the offline app: entries as devices receive them, and the gap snapshot."""

import json
from collections import namedtuple
from collections.abc import Iterable
from datetime import UTC, datetime

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection

from counters import keys as counter_keys
from counters.selectors import (
    UnreadCounts,
    channel_conversations,
    counters_channel_states,
    counters_get,
    counters_truth_mentions,
    counters_truth_recalled,
    counts_from_fields,
    counts_with_channels,
)
from counters.strategies import get_strategy
from imcore.models import Device, Membership, Message
from imcore.selectors import message_fields

from . import store
from .store import Entry

_json = DjangoJSONEncoder()

TYPES = {
    "m": "message",
    "r": "read",
    "j": "join",
    "l": "leave",
    "u": "mute",
    "d": "recall",
    "e": "edit",
}


def message_out(message: "Message | MessageRow") -> dict:
    """The API's message shape, JSON-ready (stored in prepared packages): ``created_at`` in
    the rest of the API's format (DjangoJSONEncoder: ms precision, "Z"; a row of
    :func:`messages_by_seq` has it formatted so already)."""
    out = message_fields(message)
    out["created_at"] = _encoded(message.created_at)
    if message.edited_at is not None:
        out["edited_at"] = _encoded(message.edited_at)
    return out


def _encoded(value: datetime | str) -> str:
    return value if isinstance(value, str) else _json.default(value)


def channel_message_out(conversation_id: int, seq: int) -> dict | None:
    """One message as the API renders it (None if there is no such row)."""
    message = Message.objects.filter(conversation_id=conversation_id, seq=seq).first()
    return message_out(message) if message is not None else None


# A message row as :func:`message_out` reads it: the attribute names of
# :class:`~imcore.models.Message`, the times already in the API's format.
MessageRow = namedtuple(
    "MessageRow",
    "id conversation_id seq sender_id body client_msg_id created_at mentions mention_all "
    "deleted edit_count edited_at",
)


def _sql_api_time(column: str) -> str:
    """SQL formatting a timestamptz as DjangoJSONEncoder does (UTC, milliseconds cut, none when
    the microseconds are 0, "Z"): loading and formatting 100 datetimes in Python cost more
    than the rest of the rows (README 3e)."""
    micros = f"mod(date_part('microseconds', {column})::bigint, 1000000)"
    return (
        f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN "
        f"{micros} = 0 THEN '' ELSE '.' || to_char({micros} / 1000, 'FM000') END || 'Z'"
    )


_MESSAGES_BY_SEQ = (
    "SELECT "
    + ", ".join(
        _sql_api_time(f"m.{f}") if f.endswith("_at") else f"m.{f}" for f in MessageRow._fields
    )
    + f" FROM {Message._meta.db_table} m JOIN unnest(%s::bigint[], %s::bigint[]) AS k(c, s) "
    "ON m.conversation_id = k.c AND m.seq = k.s"
)


def messages_by_seq(pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], MessageRow]:
    """Messages by ``(conversation id, seq)``, in one query whatever their number. Plain rows,
    not model instances: building 100 instances was a third of a pull's CPU (README 3e)."""
    pairs = list(pairs)
    if not pairs:
        return {}
    # The two arrays as PostgreSQL's text form: psycopg dumps a list of ints item by item in
    # Python, 2.5x the client CPU of the query for 100 pairs.
    cids, seqs = ("{" + ",".join(map(str, column)) + "}" for column in zip(*pairs, strict=True))
    with connection.cursor() as cursor:
        cursor.execute(_MESSAGES_BY_SEQ, [cids, seqs])
        rows = cursor.fetchall()
    return {(row[1], row[2]): MessageRow(*row) for row in rows}


def entries_out(entries: list[Entry], package: dict[int, dict] | None = None) -> list[dict]:
    """Entries as the API returns them. Message entries come from the device's prepared
    package when it has them, else from the message table (one query for all)."""
    package = package or {}
    wanted = [
        (e.conversation_id, int(e.arg.split(":")[0]))
        for e in entries
        if (e.type == "m" and e.version not in package) or e.type in ("d", "e")
    ]
    messages = messages_by_seq(wanted)
    out = []
    for e in entries:
        if e.type == "m" and e.version in package:
            out.append(package[e.version])
            continue
        item = {"version": e.version, "type": TYPES[e.type], "conversation_id": e.conversation_id}
        if e.type == "m":
            seq = int(e.arg)
            message = messages.get((e.conversation_id, seq))
            item["seq"] = seq
            item["message"] = message_out(message) if message else None
        elif e.type == "r":
            item["seq"] = int(e.arg)
        elif e.type == "j":
            item.update(json.loads(e.arg))
        elif e.type == "u":
            item["muted"] = e.arg == "1"
        elif e.type in ("d", "e"):
            # The message as it is now (its final state: a tombstone, or the newest body).
            seq = int(e.arg.split(":")[0])
            message = messages.get((e.conversation_id, seq))
            item["seq"] = seq
            item["message"] = message_out(message) if message else None
        out.append(item)
    return out


def badge_version(user_id: int) -> int:
    """The version a badge carries (``badge_version``): the user's latest version, read just
    before the badge is, so the badge reflects every change up to it. Versions only grow, so
    a client that keeps the badge with the highest version never goes back to an older one."""
    return store.current_version(user_id)


def unread_with_version(user_id: int) -> tuple[UnreadCounts, int]:
    """The user's counters and their ``badge_version`` (read just before them), the two in one
    Redis round trip; the hash is rebuilt from PostgreSQL when Redis does not hold it."""
    version, fields = store.version_and_counters(user_id)
    return _counts(user_id, fields), version


def sync_badge(user_id: int, fields: dict[str, str] | None) -> int:
    """The badge from a counter hash read with a page (plus the channel-form conversations)."""
    return _counts(user_id, fields).badge


def _counts(user_id: int, fields: dict[str, str] | None) -> UnreadCounts:
    """The counts of a counter hash already read (rebuilt first when Redis did not hold it),
    with the channel-form conversations."""
    return counts_with_channels(counter_fields(user_id, fields))


def counter_fields(user_id: int, fields: dict[str, str] | None = None) -> dict[str, str]:
    """The user's counter hash (``fields`` if already read), loaded from PostgreSQL first when
    Redis does not hold it."""
    if fields is None:
        fields = get_strategy().fetch(user_id)
    if counter_keys.READY not in fields:
        counters_get(user_id=user_id)  # rebuilds the hash
        fields = get_strategy().fetch(user_id)
    return fields


def channel_conversation_ids(user_id: int) -> set[int]:
    """The user's conversations whose counters are in channel form (large groups)."""
    return set(channel_conversations(counter_fields(user_id)))


def sync_channels(
    *, user_id: int, after_ms: int | None, fields: dict[str, str] | None = None
) -> list[dict]:
    """``/sync``'s ``channels``: the state of the user's channel-form conversations whose top
    changed at or after ``after_ms`` minus ``SYNC_CHANNELS_MARGIN_MS`` (all of them when
    ``after_ms`` is None, or when a top's time is unknown). ``fields`` is the user's counter
    hash if the caller read it already; then this costs one round trip (the channel keys, in one
    pipeline), and none when the user is in no such conversation: O(the user's large groups).

    Why the time says enough: a device whose ``since`` is version V got V in a page (or frame)
    whose ``channels`` were read after V was written, so it knows every top as of V's time; a
    top that changed after that has a later ``ms`` (both clocks are Redis ``TIME``; the
    margin covers the skew between Redis nodes). Listing an unchanged one does no harm."""
    fields = counter_fields(user_id, fields)
    reads = {
        cid: int(fields.get(counter_keys.read_field(cid)) or 0)
        for cid in channel_conversations(fields)
    }
    if not reads:
        return []
    states = counters_channel_states(reads)
    if after_ms is not None:
        cutoff = after_ms - settings.SYNC_CHANNELS_MARGIN_MS
        states = {
            cid: s for cid, s in states.items() if s.changed_ms <= 0 or s.changed_ms >= cutoff
        }
    counts = counts_from_fields(fields, states)
    return [
        {
            "conversation_id": cid,
            "last_seq": max(s.top, int(fields.get(counter_keys.top_field(cid)) or 0)),
            "read_seq": reads[cid],
            "unread": counts.conversations.get(cid, 0),
            "unread_mentions": counts.mentions.get(cid, 0),
        }
        for cid, s in sorted(states.items())
    ]


def sync_snapshot(*, user_id: int, latest_version: int) -> dict:
    """The state of every conversation of the user, from PostgreSQL (the truth): last seq,
    read pointer, unread (recalled messages not counted), unread mentions, muted and the last
    ``SYNC_SNAPSHOT_MESSAGES`` messages (tombstones and edited bodies as they are); four
    queries whatever the number of conversations. Channel-mode groups are in it like the
    others (``last_seq`` in PostgreSQL is committed by every send, whatever the mode).
    ``latest_version`` must have been read before this is called: the snapshot holds
    everything up to it (maybe more, which entries after it repeat harmlessly: every entry
    applies idempotently)."""
    memberships = list(
        Membership.objects.filter(user_id=user_id, left_at__isnull=True)
        .select_related("conversation")
        .order_by("conversation_id")
    )
    last = _last_messages([m.conversation_id for m in memberships])
    mentions = counters_truth_mentions(user_ids=[user_id])
    recalled = counters_truth_recalled(user_ids=[user_id])
    conversations = []
    badge = 0
    for m in memberships:
        c = m.conversation
        unread = max(c.last_seq - m.last_read_seq - len(recalled.get((user_id, c.pk), ())), 0)
        if not m.muted:
            badge += unread
        conversations.append(
            {
                "conversation_id": c.pk,
                "kind": c.kind,
                "title": c.title,
                "last_seq": c.last_seq,
                "read_seq": m.last_read_seq,
                "unread": unread,
                "unread_mentions": len(mentions.get((user_id, c.pk), ())),
                "muted": m.muted,
                "messages": [message_out(x) for x in last.get(c.pk, [])],
            }
        )
    return {
        "latest_version": latest_version,
        "badge": badge,
        "badge_version": latest_version,  # the truth's badge, read after that version
        "conversations": conversations,
    }


def _last_messages(conversation_ids: list[int]) -> dict[int, list[Message]]:
    if not conversation_ids:
        return {}
    table = Message._meta.db_table
    rows = Message.objects.raw(
        f"SELECT m.* FROM unnest(%s::bigint[]) AS c(id) CROSS JOIN LATERAL ("
        f"  SELECT * FROM {table} WHERE conversation_id = c.id ORDER BY seq DESC LIMIT %s"
        ") m ORDER BY m.conversation_id, m.seq",
        [conversation_ids, settings.SYNC_SNAPSHOT_MESSAGES],
    )
    out: dict[int, list[Message]] = {}
    for m in rows:
        out.setdefault(m.conversation_id, []).append(m)
    return out


def device_acked_version(device: Device) -> int:
    """The device's cumulative ack: PostgreSQL's, or a newer one not flushed yet."""
    pending = store.acks_pending([device.pk]).get(device.pk, 0)
    return max(device_field(device, "acked_version") or 0, pending)


def device_field(device: Device, name: str):
    """A field of the device, read from PostgreSQL if the token cache left it deferred (None
    when the row is gone: the device was logged out meanwhile)."""
    if name in device.get_deferred_fields():
        value = Device.objects.filter(pk=device.pk).values_list(name, flat=True).first()
        setattr(device, name, value)
    return getattr(device, name)


def devices_sync_state(devices: list[Device]) -> dict[int, tuple[int, int | None]]:
    """``{device pk: (acked version, user's latest version or None)}`` for the admin, in two
    round trips."""
    pending = store.acks_pending(d.pk for d in devices)
    latest = store.peek_latest({d.user_id for d in devices})
    return {
        d.pk: (max(d.acked_version, pending.get(d.pk, 0)), latest.get(d.user_id)) for d in devices
    }


def devices_last_seen(devices: list[Device]) -> dict[int, datetime | None]:
    """When each device was last seen, including what the next flush will write."""
    pending = store.seen_pending(d.pk for d in devices)
    out = {}
    for d in devices:
        ms = pending.get(d.pk)
        recent = datetime.fromtimestamp(ms / 1000, tz=UTC) if ms is not None else None
        out[d.pk] = max((t for t in (d.last_seen_at, recent) if t is not None), default=None)
    return out


def device_list(*, user, current: Device) -> list[dict]:
    """A user's devices for ``GET /devices``: online (live WebSocket), last seen and acked
    version including what is not flushed to PostgreSQL yet."""
    devices = list(Device.objects.filter(user=user).order_by("created_at", "pk"))
    online = store.presence_online([user.pk])[user.pk]
    acked = devices_sync_state(devices)
    seen = devices_last_seen(devices)
    return [
        {
            "device_id": d.device_id,
            "platform": d.platform,
            "current": d.pk == current.pk,
            "online": d.pk in online,
            "last_seen_at": seen[d.pk],
            "acked_version": acked[d.pk][0],
            "push": bool(d.pushkey),
        }
        for d in devices
    ]
