"""The two sync calls of the HTTP API v1 (registered on :data:`imcore.api.api`)."""

from typing import Annotated, Literal

from django.conf import settings
from ninja import Field, Query, Router, Schema
from pydantic import BeforeValidator

from imcore.apis import BIGINT_MAX, Body, integral, responses

from . import services

router = Router(tags=["sync"])

Version = Annotated[int, Field(ge=0, le=BIGINT_MAX), BeforeValidator(integral)]


class SyncMessageOut(Schema):
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


class SyncEntryOut(Schema):
    """One entry. Every type has ``version``, ``type`` and ``conversation_id``; then
    ``message``: ``seq``, ``message`` (null only if the message row is gone);
    ``read``: ``seq`` (the user read up to it on some device);
    ``join``: ``kind``, ``title``, ``last_seq``, ``read_seq``, ``muted``;
    ``leave``: nothing more; ``mute``: ``muted``. A message entry whose sender is the user
    also moves the read pointer to its seq."""

    version: int
    type: Literal["message", "read", "join", "leave", "mute"]
    conversation_id: int
    seq: int | None = None
    message: SyncMessageOut | None = None
    kind: str | None = None
    title: str | None = None
    last_seq: int | None = None
    read_seq: int | None = None
    muted: bool | None = None


class SnapshotConversationOut(Schema):
    conversation_id: int
    kind: str
    title: str
    last_seq: int
    read_seq: int
    unread: int
    muted: bool
    messages: list[SyncMessageOut]


class SnapshotOut(Schema):
    latest_version: int
    badge: int
    conversations: list[SnapshotConversationOut]


class SyncOut(Schema):
    entries: list[SyncEntryOut]
    latest_version: int
    has_more: bool
    gap: bool
    snapshot: SnapshotOut | None = None


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
    ``since`` ahead of ``latest_version`` is a 400."""
    return services.sync_pull(device=request.device, since=since, limit=limit)


class AckIn(Body):
    version: Version


class AckOut(Schema):
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
