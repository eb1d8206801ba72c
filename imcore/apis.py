"""The HTTP API v1 operations, one function per operation with its input and output schema
beside it. Views parse and authorize, then call a service or a selector; they hold no rules."""

from datetime import datetime
from typing import Annotated, Literal

from django.conf import settings
from ninja import Field, Path, Query, Router, Schema, Status
from pydantic import ConfigDict, field_validator

from counters.selectors import counters_get
from offline.selectors import device_list

from . import selectors, services
from .models import Conversation

router = Router()

# PostgreSQL bigint: ids and seqs above it are rejected as input instead of failing in SQL.
BIGINT_MAX = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=BIGINT_MAX)]
Seq = Annotated[int, Field(ge=0, le=BIGINT_MAX)]
ConversationId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]


class Body(Schema):
    """A JSON request body: types are strict (``"5"`` is not a number) and unknown fields are
    refused, so a typo cannot pass as a no-op."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def no_nul(cls, value):
        # PostgreSQL text cannot hold NUL; refuse it here rather than fail in SQL.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain the NUL character (\\u0000)")
        return value


class ErrorOut(Schema):
    error: str
    message: str
    details: object | None = None


ERRORS = {
    400: ErrorOut,
    401: ErrorOut,
    403: ErrorOut,
    404: ErrorOut,
    409: ErrorOut,
    413: ErrorOut,
    422: ErrorOut,
    503: ErrorOut,
}


# ---- users and devices ---------------------------------------------------------------------


class UserCreateIn(Body):
    username: str = Field(min_length=1, max_length=150)
    password: str = Field(min_length=1, max_length=128)


class UserOut(Schema):
    id: int
    username: str


@router.post("/users", auth=None, response={201: UserOut, **ERRORS}, tags=["users"])
def user_create_api(request, payload: UserCreateIn):
    """Sign up (``API_SIGNUP_ENABLED`` turns it off)."""
    user = services.user_create(username=payload.username, password=payload.password)
    return Status(201, user)


class DeviceLoginIn(Body):
    username: str = Field(min_length=1, max_length=150)
    password: str = Field(min_length=1, max_length=128)
    device_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    platform: Literal["ios", "android", "web", "desktop"]
    pushkey: str | None = Field(default=None, min_length=1, max_length=512)
    push_app_id: str | None = Field(default=None, min_length=1, max_length=64)


class DeviceLoginOut(Schema):
    device_id: str
    user_id: int
    token: str


@router.post("/devices", auth=None, response={201: DeviceLoginOut, **ERRORS}, tags=["devices"])
def device_login_api(request, payload: DeviceLoginIn):
    """Log a device in and get its bearer token (shown once; a new login replaces it)."""
    device, token = services.device_login(
        username=payload.username,
        password=payload.password,
        device_id=payload.device_id,
        platform=payload.platform,
        pushkey=payload.pushkey,
        push_app_id=payload.push_app_id,
    )
    return Status(201, {"device_id": device.device_id, "user_id": device.user_id, "token": token})


class DeviceOut(Schema):
    device_id: str
    platform: str
    current: bool
    online: bool
    last_seen_at: datetime | None
    acked_version: int
    push: bool


class DevicesOut(Schema):
    devices: list[DeviceOut]


@router.get("/devices", response={200: DevicesOut, **ERRORS}, tags=["devices"])
def device_list_api(request):
    """My devices: platform, online now (a live WebSocket), last seen, acked sync version,
    and whether push notifications are registered."""
    return {"devices": device_list(user=request.device.user, current=request.device)}


class PushkeyIn(Body):
    pushkey: str = Field(min_length=1, max_length=512)
    app_id: str | None = Field(default=None, min_length=1, max_length=64)


@router.put("/devices/current/pushkey", response={204: None, **ERRORS}, tags=["devices"])
def pushkey_set_api(request, payload: PushkeyIn):
    """Register (or replace) this device's pushkey for push notifications while offline."""
    services.device_pushkey_set(
        device=request.device, pushkey=payload.pushkey, app_id=payload.app_id
    )
    return Status(204, None)


@router.delete("/devices/current/pushkey", response={204: None, **ERRORS}, tags=["devices"])
def pushkey_delete_api(request):
    """Stop push notifications to this device."""
    services.device_pushkey_set(device=request.device, pushkey="", app_id=None)
    return Status(204, None)


# ---- conversations -------------------------------------------------------------------------


class ConversationCreateIn(Body):
    kind: Literal["direct", "group"]
    members: list[Id] = Field(default_factory=list, max_length=settings.GROUP_MAX_MEMBERS)
    title: str = Field(default="", max_length=200)


class ConversationOut(Schema):
    id: int
    kind: str
    title: str
    members: list[int]
    last_seq: int


def conversation_out(conversation: Conversation) -> dict:
    return {
        "id": conversation.pk,
        "kind": conversation.kind,
        "title": conversation.title,
        "members": selectors.conversation_member_ids(conversation=conversation),
        "last_seq": conversation.last_seq,
    }


@router.post(
    "/conversations",
    response={200: ConversationOut, 201: ConversationOut, **ERRORS},
    tags=["conversations"],
)
def conversation_create_api(request, payload: ConversationCreateIn):
    """Create a direct or group conversation; an existing direct pair comes back with 200."""
    conversation, created = services.conversation_create(
        creator=request.auth.user,
        kind=payload.kind,
        member_ids=payload.members,
        title=payload.title,
    )
    return Status(201 if created else 200, conversation_out(conversation))


class ConversationListItem(Schema):
    id: int
    kind: str
    title: str
    last_seq: int
    last_read_seq: int
    unread: int
    unread_mentions: int = Field(
        description="Unread messages that mention me (or everyone); counted when muted too"
    )
    muted: bool


@router.get(
    "/conversations", response={200: list[ConversationListItem], **ERRORS}, tags=["conversations"]
)
def conversation_list_api(request):
    """My conversations, newest activity first, with unread counts."""
    return [
        {
            "id": s.conversation.pk,
            "kind": s.conversation.kind,
            "title": s.conversation.title,
            "last_seq": s.conversation.last_seq,
            "last_read_seq": s.membership.last_read_seq,
            "unread": s.unread,
            "unread_mentions": s.unread_mentions,
            "muted": s.membership.muted,
        }
        for s in selectors.conversation_list(user=request.auth.user)
    ]


class MembersAddIn(Body):
    user_ids: list[Id] = Field(min_length=1, max_length=1000)


class MembersAddOut(Schema):
    added: list[int]
    conversation: ConversationOut


@router.post(
    "/conversations/{conversation_id}/members",
    response={200: MembersAddOut, **ERRORS},
    tags=["conversations"],
)
def members_add_api(request, conversation_id: ConversationId, payload: MembersAddIn):
    """Add users to a group; they start with nothing unread."""
    membership = selectors.membership_get_active(
        user=request.auth.user, conversation_id=conversation_id
    )
    added = services.members_add(
        actor=request.auth.user, conversation=membership.conversation, user_ids=payload.user_ids
    )
    membership.conversation.refresh_from_db()
    return {"added": added, "conversation": conversation_out(membership.conversation)}


@router.delete(
    "/conversations/{conversation_id}/members/{user_id}",
    response={204: None, **ERRORS},
    tags=["conversations"],
)
def member_remove_api(
    request, conversation_id: ConversationId, user_id: Annotated[int, Path(ge=1, le=BIGINT_MAX)]
):
    """Leave a group (your own id; repeating it answers 204 again) or, as its creator,
    remove someone."""
    lookup = (
        selectors.membership_get_any
        if user_id == request.auth.user.pk
        else selectors.membership_get_active
    )
    membership = lookup(user=request.auth.user, conversation_id=conversation_id)
    services.member_remove(
        actor=request.auth.user, conversation=membership.conversation, user_id=user_id
    )
    return Status(204, None)


# ---- messages, reads, mutes, counters ------------------------------------------------------


class MessageSendIn(Body):
    body: str = Field(min_length=1, max_length=settings.MESSAGE_BODY_MAX_CHARS)
    client_msg_id: str = Field(min_length=1, max_length=64)
    mentions: list[Id] = Field(
        default_factory=list,
        max_length=settings.MESSAGE_MENTIONS_MAX,
        description="User ids the message mentions: active members of the conversation "
        "(anyone else: 400); duplicates are folded. Each mentioned member, other than the "
        "sender, has the message among their unread mentions until they read past it.",
    )
    mention_all: bool = Field(
        default=False,
        description="Mention every member but the sender: groups only (400 in a direct "
        "conversation), by the group's creator only (403).",
    )


class MessageOut(Schema):
    id: int
    conversation_id: int
    seq: int
    sender_id: int
    body: str
    client_msg_id: str
    created_at: datetime
    mentions: list[int]
    mention_all: bool


message_out = selectors.message_fields


@router.post(
    "/conversations/{conversation_id}/messages",
    response={200: MessageOut, 201: MessageOut, **ERRORS},
    tags=["messages"],
)
def message_send_api(request, conversation_id: ConversationId, payload: MessageSendIn):
    """Send a message, optionally mentioning members (``mentions``) or everyone
    (``mention_all``); repeating a ``client_msg_id`` returns the stored message with 200."""
    membership = selectors.membership_get_active(
        user=request.auth.user, conversation_id=conversation_id
    )
    message, created = services.message_send(
        sender=request.auth.user,
        conversation=membership.conversation,
        body=payload.body,
        client_msg_id=payload.client_msg_id,
        mentions=payload.mentions,
        mention_all=payload.mention_all,
    )
    return Status(201 if created else 200, message_out(message))


class MessageListOut(Schema):
    messages: list[MessageOut]
    has_more: bool


@router.get(
    "/conversations/{conversation_id}/messages",
    response={200: MessageListOut, **ERRORS},
    tags=["messages"],
)
def message_list_api(
    request,
    conversation_id: ConversationId,
    after_seq: Annotated[int, Query(ge=0, le=BIGINT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=settings.MESSAGES_PAGE_MAX)] = 50,
):
    """History in ascending seq, after ``after_seq``."""
    membership = selectors.membership_get_active(
        user=request.auth.user, conversation_id=conversation_id
    )
    page = list(
        selectors.message_list(
            conversation=membership.conversation, after_seq=after_seq, limit=limit + 1
        )
    )
    return {"messages": [message_out(m) for m in page[:limit]], "has_more": len(page) > limit}


class ReadIn(Body):
    seq: Seq


class CountsOut(Schema):
    unread: int
    badge: int


@router.post(
    "/conversations/{conversation_id}/read",
    response={200: CountsOut, **ERRORS},
    tags=["counters"],
)
def conversation_read_api(request, conversation_id: ConversationId, payload: ReadIn):
    """Mark read up to ``seq`` (never moves back); the new counts are in the answer."""
    membership = selectors.membership_get_active(
        user=request.auth.user, conversation_id=conversation_id
    )
    unread, badge = services.conversation_mark_read(membership=membership, seq=payload.seq)
    return {"unread": unread, "badge": badge}


class MuteIn(Body):
    muted: bool


class MuteOut(Schema):
    conversation_id: int
    muted: bool
    unread: int
    badge: int


@router.post(
    "/conversations/{conversation_id}/mute",
    response={200: MuteOut, **ERRORS},
    tags=["counters"],
)
def conversation_mute_api(request, conversation_id: ConversationId, payload: MuteIn):
    """Mute or unmute: a muted conversation's unread count stays out of the badge."""
    membership = selectors.membership_get_active(
        user=request.auth.user, conversation_id=conversation_id
    )
    unread, badge = services.conversation_mute(membership=membership, muted=payload.muted)
    return {
        "conversation_id": conversation_id,
        "muted": payload.muted,
        "unread": unread,
        "badge": badge,
    }


class UnreadOut(Schema):
    badge: int
    conversations: dict[str, int]
    mentions: dict[str, int] = Field(
        description="Unread mentions per conversation id, only conversations with at least "
        "one; not part of the badge, and counted in muted conversations too"
    )


@router.get("/unread", response={200: UnreadOut, **ERRORS}, tags=["counters"])
def unread_get_api(request):
    """My badge and the unread count of each of my conversations."""
    counts = counters_get(user_id=request.auth.user.pk)
    return {
        "badge": counts.badge,
        "conversations": {str(cid): n for cid, n in sorted(counts.conversations.items())},
        "mentions": {str(cid): n for cid, n in sorted(counts.mentions.items())},
    }
