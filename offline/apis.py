"""The two sync calls of the HTTP API v1 (registered on :data:`imcore.api.api`)."""

from typing import Annotated, Literal

import orjson
from django.conf import settings
from django.http import HttpResponse
from ninja import Field, Query, Router
from ninja.responses import NinjaJSONEncoder
from pydantic import BeforeValidator

from imcore.apis import BIGINT_MAX, Body, Out, integral, responses

from . import services

_ENCODER = NinjaJSONEncoder()
# Datetimes through _ENCODER (the API's format); a key that is not a string written as one, as
# json.dumps would.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS

router = Router(tags=["sync"])

Version = Annotated[int, Field(ge=0, le=BIGINT_MAX), BeforeValidator(integral)]


class SyncMessageOut(Out):
    id: int
    conversation_id: int
    seq: int
    sender_id: int
    body: str
    client_msg_id: str
    created_at: str
    # (a package prepared before mentions existed has neither: the defaults)
    mentions: list[int] = Field(default_factory=list)
    mention_all: bool = False
    deleted: bool = False
    edit_count: int = 0
    edited_at: str | None = None


class SyncEntryOut(Out):
    """One entry. Every type has ``version``, ``type`` and ``conversation_id``; then
    ``message``: ``seq``, ``message`` (null only if the message row is gone);
    ``read``: ``seq`` (the user read up to it on some device);
    ``join``: ``kind``, ``title``, ``last_seq``, ``read_seq``, ``muted``;
    ``leave``: nothing more; ``mute``: ``muted``; ``recall`` and ``edit``: ``seq`` and
    ``message`` as it is now (a tombstone with ``deleted`` true, or the newest body). A
    message entry whose sender is the user also moves the read pointer to its seq."""

    version: int
    type: Literal["message", "read", "join", "leave", "mute", "recall", "edit"]
    conversation_id: int
    seq: int | None = None
    message: SyncMessageOut | None = None
    kind: str | None = None
    title: str | None = None
    last_seq: int | None = None
    read_seq: int | None = None
    muted: bool | None = None


class SnapshotConversationOut(Out):
    conversation_id: int
    kind: str
    title: str
    last_seq: int
    read_seq: int
    unread: int
    unread_mentions: int
    muted: bool
    messages: list[SyncMessageOut]


class SnapshotOut(Out):
    latest_version: int
    badge: int
    badge_version: int
    conversations: list[SnapshotConversationOut]


class SyncChannelOut(Out):
    """A channel-mode (large) group of the user: its counters now. Its messages write no
    entries; read them with the history call."""

    conversation_id: int
    last_seq: int
    read_seq: int
    unread: int
    unread_mentions: int


class SyncOut(Out):
    entries: list[SyncEntryOut]
    latest_version: int
    has_more: bool
    gap: bool
    snapshot: SnapshotOut | None = None
    channels: list[SyncChannelOut] = Field(default_factory=list)
    badge: int
    badge_version: int = Field(
        description="The version the badge was read at; keep the badge with the highest one."
    )


@router.get(
    "/sync",
    exclude_none=True,
    **responses(
        {200: SyncOut},
        errors=(401, 422),
        refusals="``since`` is ahead of the user's latest version (``details.latest_version``).",
    ),
)
def sync_pull_api(
    request,
    since: Annotated[int, Query(ge=0, le=BIGINT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=settings.SYNC_PAGE_MAX)] = settings.SYNC_PAGE_DEFAULT,
):
    """Entries with version > ``since``, in order, at most ``limit``
    (``SYNC_PAGE_MAX``). A ``since`` behind what the offline store still holds (offline too
    long, or a new device) gets ``gap: true`` and a ``snapshot`` of every conversation
    instead: replace local state with it and continue from its ``latest_version``. A
    ``since`` ahead of ``latest_version`` is a 400.

    Large groups (channel mode, ``LARGE_GROUP_MIN_MEMBERS`` members or more) write no entry
    per message. Every answer (the gap one too, after its snapshot) has ``channels``: the
    user's large groups that changed since ``since`` (at least those; all of them after a
    gap), each with ``last_seq``, ``read_seq``, ``unread`` and ``unread_mentions`` as they are
    now. Keep the highest ``last_seq`` and ``read_seq`` seen (entries of the same answer may be
    older), and fetch the messages after your last one with ``GET
    /conversations/{id}/messages?after_seq=``. A device more than ``SYNC_SNAPSHOT_MESSAGES``
    behind a group fetches only the latest ones (``after_seq = last_seq -
    SYNC_SNAPSHOT_MESSAGES``) and takes the counts from ``channels``, like Telegram's
    ``channelDifferenceTooLong``; older ones are there to page through when wanted."""
    return rendered(services.sync_pull(device=request.device, since=since, limit=limit))


def rendered(answer: dict) -> HttpResponse:
    """``answer`` as ninja renders a ``SyncOut`` (JSON, ``None`` left out), without validating
    it against the schema again: the pages are built in that shape (the WebSocket sends the
    same dicts), and re-validating 100 entries was 30 % of a pull's CPU (README 3d). orjson
    writes it (json.dumps was an eighth of the rest, README 3e); a datetime, should one be
    there, is written as the rest of the API writes it. The pull helper of the tests checks
    every answer against ``SyncOut``."""
    answer = {k: v for k, v in answer.items() if v is not None}
    answer["entries"] = [_entry_without_none(e) for e in answer["entries"]]
    for name in ("channels", "snapshot"):
        if name in answer:
            answer[name] = _without_none(answer[name])
    return HttpResponse(
        orjson.dumps(answer, default=_ENCODER.default, option=_ORJSON_OPTIONS),
        content_type="application/json; charset=utf-8",
    )


def _without_none(value):
    # Recurses into containers only: a call per scalar was most of the render's CPU.
    if isinstance(value, dict):
        return {
            k: _without_none(v) if isinstance(v, dict | list) else v
            for k, v in value.items()
            if v is not None
        }
    return [_without_none(v) if isinstance(v, dict | list) else v for v in value]


def _entry_without_none(entry: dict) -> dict:
    """:func:`_without_none` of an entry, in a tenth of the time: an entry other than a join
    nests nothing but its ``message``, whose only container is ``mentions`` (user ids)."""
    if entry["type"] == "join" or None in entry.values():
        return _without_none(entry)
    message = entry.get("message")
    if message is not None and None in message.values():
        return {**entry, "message": _without_none(message)}
    return entry


class AckIn(Body):
    version: Version


class AckOut(Out):
    acked_version: int


@router.post(
    "/sync/ack",
    **responses(
        {200: AckOut},
        errors=(401, 422),
        body=True,
        refusals="``version`` is ahead of the user's latest version (``details.latest_version``).",
    ),
)
def sync_ack_api(request, payload: AckIn):
    """Cumulative ack for this device: it holds every entry up to ``version``. An older ack
    changes nothing; the answer is the device's ack now."""
    return {"acked_version": services.sync_ack(device=request.device, version=payload.version)}
