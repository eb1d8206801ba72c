"""The HTTP API v1 operations, one function per operation with its input and output schema
beside it. Views parse and authorize, then call a service or a selector; they hold no rules."""

from datetime import datetime
from typing import Annotated, Literal

from django.conf import settings
from django.contrib.auth.password_validation import (
    get_default_password_validators,
    password_validators_help_texts,
)
from ninja import Field, Path, Query, Router, Status
from ninja.decorators import decorate_view
from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator

from offline.selectors import device_list, unread_with_version

from . import ratelimit, selectors, services
from .direct import direct
from .models import Conversation

router = Router()


def integral(value):
    """JSON has one kind of number and JSON Schema calls ``2356.0`` an integer, so a client
    whose encoder writes integral floats is sending integers; any other float is refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# PostgreSQL bigint: ids and seqs above it are rejected as input instead of failing in SQL.
BIGINT_MAX = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=BIGINT_MAX), BeforeValidator(integral)]
Seq = Annotated[int, Field(ge=0, le=BIGINT_MAX), BeforeValidator(integral)]
ConversationId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
MessageSeq = Annotated[int, Path(ge=1, le=BIGINT_MAX)]

# The schema's pattern for a text field (PostgreSQL text cannot hold NUL).
NO_NUL = r"^[^\x00]*$"


def describe_no_nul(schema: dict, cls) -> None:
    """Give each string property of a body without a pattern of its own the NUL-free one, so
    the schema says what :meth:`Body.no_nul` refuses."""
    for prop in schema.get("properties", {}).values():
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") == "string" and "enum" not in branch and "const" not in branch:
                branch.setdefault("pattern", NO_NUL)


class Out(BaseModel):
    """An answer's schema: a plain pydantic model, read from dicts or attributes. ninja's
    ``Schema`` wraps every object it validates in a ``DjangoGetter`` first, which was a third
    of ``GET /conversations``'s CPU (README 3e); answers here need none of what it adds."""

    model_config = ConfigDict(from_attributes=True)


class Body(BaseModel):
    """A JSON request body: types are strict (``"5"`` is not a number) and unknown fields are
    refused, so a typo cannot pass as a no-op."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=describe_no_nul)

    @field_validator("*", mode="after")
    @classmethod
    def no_nul(cls, value):
        # PostgreSQL text cannot hold NUL; refuse it here rather than fail in SQL.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain the NUL character (\\u0000)")
        return value


class ErrorOut(Out):
    error: str
    message: str
    details: object | None = None


class BadRequestOut(ErrorOut):
    error: Literal["bad_request"]


class MalformedBodyOut(ErrorOut):
    error: Literal["malformed_body"]


class BadRequestOrMalformedBodyOut(ErrorOut):
    error: Literal["bad_request", "malformed_body"]


class BodyTooLargeOut(ErrorOut):
    error: Literal["body_too_large"]


# The errors an operation can answer besides 400 and 413 (see `responses`); 503 (Redis or
# PostgreSQL cannot serve) is always among them.
ERRORS = {
    401: ErrorOut,
    403: ErrorOut,
    404: ErrorOut,
    409: ErrorOut,
    422: ErrorOut,
    # Calls that check a password answer 429 ``rate_limited`` (with Retry-After) past a limit.
    429: ErrorOut,
    503: ErrorOut,
}


def responses(
    answers: dict, *, errors=tuple(ERRORS), body: bool = False, refusals: str = ""
) -> dict:
    """The ``response`` and ``openapi_extra`` arguments of an operation: its answers and its
    ``errors`` (statuses of ``ERRORS``; 503 always). ``refusals`` says when a request the
    schema allows still gets 400 ``bad_request`` (what a schema cannot say: an id that does
    not exist, a seq past the last one); an operation without it never answers 400
    ``bad_request``. An operation that takes a ``body`` can also answer 400
    ``malformed_body`` (not JSON) and 413 ``body_too_large``."""
    response = {**answers, **{status: ERRORS[status] for status in (*errors, 503)}}
    notes = {}
    if refusals and body:
        response[400] = BadRequestOrMalformedBodyOut
    elif refusals:
        response[400] = BadRequestOut
    elif body:
        response[400] = MalformedBodyOut
    if refusals or body:
        notes[400] = " ".join(
            ([f"``bad_request``: {refusals}"] if refusals else [])
            + (["``malformed_body``: the body is not JSON."] if body else [])
        )
    if body:
        response[413] = BodyTooLargeOut
        notes[413] = (
            f"``body_too_large``: the body is larger than {settings.API_MAX_BODY_BYTES} bytes "
            "(``API_MAX_BODY_BYTES``); "
            + (
                "every body this schema allows fits."
                if settings.API_MAX_BODY_BYTES >= settings.API_SCHEMA_BODY_BYTES
                else "this server's limit is lower than the largest body this schema allows."
            )
        )
    return {
        "response": response,
        "openapi_extra": {"responses": {s: {"description": d} for s, d in notes.items()}},
    }


# ---- users and devices ---------------------------------------------------------------------


PASSWORD_RULES = " ".join(password_validators_help_texts())
# The one password rule a schema can say (a shorter password gets 400 bad_request).
PASSWORD_MIN_CHARS = max(
    [getattr(v, "min_length", 1) for v in get_default_password_validators()] + [1]
)


class UserCreateIn(Body):
    username: str = Field(
        min_length=1,
        max_length=150,
        # Django's rule is Python's Unicode \w, which a JSON Schema pattern (ECMA-262, where \w
        # is ASCII) cannot say: a pattern would call "é" invalid while the server takes it.
        description="Letters (any script), digits and @ . + - _ only (else 400 bad_request).",
    )
    password: str = Field(
        min_length=1,
        max_length=128,
        description=f"The server's password rules (else 400 bad_request): {PASSWORD_RULES}",
        json_schema_extra={"minLength": PASSWORD_MIN_CHARS},
    )


class UserOut(Out):
    id: int
    username: str


@router.post(
    "/users",
    auth=None,
    tags=["users"],
    **responses(
        {201: UserOut},
        errors=(403, 409, 422, 429),  # sign-up off; the username is taken; rate limit
        body=True,
        refusals="the password breaks one of the server's password rules (see ``password``), "
        "or the username one of Django's (``details`` lists which).",
    ),
)
def user_create_api(request, payload: UserCreateIn):
    """Sign up (``API_SIGNUP_ENABLED`` turns it off). Rate-limited per username and per client
    address (``AUTH_RATE_SIGNUP_*``): 429 with ``Retry-After``."""
    ratelimit.auth_attempt(request=request, action="signup", username=payload.username)
    user = services.user_create(username=payload.username, password=payload.password)
    return Status(201, user)


DEVICE_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"


class DeviceLoginIn(Body):
    username: str = Field(min_length=1, max_length=150)
    password: str = Field(min_length=1, max_length=128)
    device_id: str = Field(
        min_length=1,
        max_length=64,
        pattern=DEVICE_ID_PATTERN,
        description='Any id but "current", which names the calling device in the API.',
    )
    platform: Literal["ios", "android", "web", "desktop"]
    pushkey: str | None = Field(default=None, min_length=1, max_length=512)
    push_app_id: str | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("device_id", mode="after")
    @classmethod
    def not_current(cls, value: str) -> str:
        if value == "current":
            raise ValueError('"current" names the calling device in the API; choose another id')
        return value


class DeviceLoginOut(Out):
    device_id: str
    user_id: int
    token: str


@router.post(
    "/devices",
    auth=None,
    tags=["devices"],
    **responses({201: DeviceLoginOut}, errors=(401, 422, 429), body=True),
)
def device_login_api(request, payload: DeviceLoginIn):
    """Log a device in and get its bearer token (shown once; a new login replaces it).
    Rate-limited per username and per client address (``AUTH_RATE_LOGIN_*``): past a limit
    the answer is 429 with ``Retry-After`` and the password is not checked."""
    ratelimit.auth_attempt(request=request, action="login", username=payload.username)
    device, token = services.device_login(
        username=payload.username,
        password=payload.password,
        device_id=payload.device_id,
        platform=payload.platform,
        pushkey=payload.pushkey,
        push_app_id=payload.push_app_id,
    )
    return Status(201, {"device_id": device.device_id, "user_id": device.user_id, "token": token})


class DeviceOut(Out):
    device_id: str
    platform: str
    current: bool
    online: bool
    last_seen_at: datetime | None
    acked_version: int
    push: bool


class DevicesOut(Out):
    devices: list[DeviceOut]


@router.get("/devices", tags=["devices"], **responses({200: DevicesOut}, errors=(401,)))
def device_list_api(request):
    """My devices: platform, online now (a live WebSocket), last seen, acked sync version,
    and whether push notifications are registered."""
    return {"devices": device_list(user=request.device.user, current=request.device)}


class PushkeyIn(Body):
    pushkey: str = Field(min_length=1, max_length=512)
    app_id: str | None = Field(default=None, min_length=1, max_length=64)


@router.put(
    "/devices/current/pushkey",
    tags=["devices"],
    **responses({204: None}, errors=(401, 422), body=True),
)
def pushkey_set_api(request, payload: PushkeyIn):
    """Register (or replace) this device's pushkey for push notifications while offline."""
    services.device_pushkey_set(
        device=request.device, pushkey=payload.pushkey, app_id=payload.app_id
    )
    return Status(204, None)


@router.delete(
    "/devices/current/pushkey", tags=["devices"], **responses({204: None}, errors=(401,))
)
def pushkey_delete_api(request):
    """Stop push notifications to this device."""
    services.device_pushkey_set(device=request.device, pushkey="", app_id=None)
    return Status(204, None)


@router.delete("/devices/current", tags=["devices"], **responses({204: None}, errors=(401,)))
def device_logout_current_api(request):
    """Log this device out: its token stops working at once and its WebSocket closes
    (4401)."""
    services.device_logout(device=request.device)
    return Status(204, None)


DeviceId = Annotated[str, Path(min_length=1, max_length=64, pattern=DEVICE_ID_PATTERN)]


@router.delete(
    "/devices/{device_id}", tags=["devices"], **responses({204: None}, errors=(401, 404, 422))
)
def device_logout_api(request, device_id: DeviceId):
    """Log one of my devices out (a lost phone): its token stops working at once, its open
    WebSocket closes (4401), its pushkey and presence are forgotten and it leaves
    ``GET /devices``. Another user's device is not found (404)."""
    device = selectors.device_get(user=request.auth.user, device_id=device_id)
    services.device_logout(device=device)
    return Status(204, None)


class PasswordChangeIn(Body):
    old_password: str = Field(min_length=1, max_length=128)
    new_password: str = Field(
        min_length=1,
        max_length=128,
        description=f"The server's password rules (else 400 bad_request): {PASSWORD_RULES}",
        json_schema_extra={"minLength": PASSWORD_MIN_CHARS},
    )


@router.post(
    "/users/me/password",
    tags=["users"],
    **responses(
        {204: None},
        errors=(401, 403, 422, 429),  # the old password is wrong (403); rate limit (429)
        body=True,
        refusals="the new password breaks one of the server's password rules (see "
        "``new_password``; ``details`` lists which).",
    ),
)
def password_change_api(request, payload: PasswordChangeIn):
    """Change my password: every other device of mine is logged out, this one stays. A wrong
    old password is 403 (this device's token is valid; 401 would tell the client its token
    died); a new password the validators refuse is 400 with their reasons. Counts as a login
    attempt of my username and address for the rate limits (429)."""
    user = request.auth.user
    ratelimit.auth_attempt(request=request, action="login", username=user.username)
    services.password_change(
        device=request.device,
        old_password=payload.old_password,
        new_password=payload.new_password,
    )
    return Status(204, None)


# ---- conversations -------------------------------------------------------------------------


class ConversationCreateIn(Body):
    kind: Literal["direct", "group"]
    members: list[Id] = Field(default_factory=list, max_length=settings.GROUP_MAX_MEMBERS)
    title: str = Field(default="", max_length=200)


class ConversationOut(Out):
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
    tags=["conversations"],
    **responses(
        {200: ConversationOut, 201: ConversationOut},
        errors=(401, 422),
        body=True,
        refusals="a member id is not an active user (``details.unknown_user_ids``); a direct "
        "conversation names other than exactly one other member; a group would have more "
        "than ``GROUP_MAX_MEMBERS`` members.",
    ),
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


class ConversationListItem(Out):
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
    "/conversations",
    tags=["conversations"],
    **responses({200: list[ConversationListItem]}, errors=(401,)),
)
def conversation_list_api(request):
    """My conversations, newest activity first, with unread counts."""
    return selectors.conversation_list(user_id=request.auth.user_id)


class MembersAddIn(Body):
    user_ids: list[Id] = Field(min_length=1, max_length=1000)


class MembersAddOut(Out):
    added: list[int]
    conversation: ConversationOut


@router.post(
    "/conversations/{conversation_id}/members",
    tags=["conversations"],
    **responses(
        {200: MembersAddOut},
        errors=(401, 404, 422),
        body=True,
        refusals="the conversation is direct; a user id is not an active user "
        "(``details.unknown_user_ids``); the group would have more than "
        "``GROUP_MAX_MEMBERS`` members.",
    ),
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
    tags=["conversations"],
    **responses(
        {204: None},
        errors=(401, 403, 404, 422),  # 403: only the group's creator removes someone else
        refusals="the conversation is direct: nobody leaves it.",
    ),
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


class MessageOut(Out):
    id: int
    conversation_id: int
    seq: int
    sender_id: int
    body: str
    client_msg_id: str
    created_at: datetime
    mentions: list[int]
    mention_all: bool
    deleted: bool = Field(
        description="Recalled: a tombstone that keeps its seq; ``body`` is empty and it has "
        "no mentions."
    )
    edit_count: int
    edited_at: datetime | None = Field(
        default=None, description="When it was last edited (absent: never)."
    )


message_out = selectors.message_fields


@router.post(
    "/conversations/{conversation_id}/messages",
    tags=["messages"],
    exclude_none=True,
    **responses(
        {200: MessageOut, 201: MessageOut},
        # 403: mention_all by someone other than the group's creator; 409: a client_msg_id
        # repeated with another body, conversation or mentions
        errors=(401, 403, 404, 409, 422),
        body=True,
        refusals="``mentions`` names a user who is not an active member of the conversation; "
        "``mention_all`` in a direct conversation.",
    ),
)
@decorate_view(direct)
def message_send_api(request, conversation_id: ConversationId, payload: MessageSendIn):
    """Send a message, optionally mentioning members (``mentions``) or everyone
    (``mention_all``); repeating a ``client_msg_id`` returns the stored message with 200. A
    conversation I am not an active member of is not found (404)."""
    message, created = services.message_send(
        sender=request.auth.user,
        conversation=conversation_id,
        body=payload.body,
        client_msg_id=payload.client_msg_id,
        mentions=payload.mentions,
        mention_all=payload.mention_all,
    )
    return Status(201 if created else 200, message_out(message))


class MessageListOut(Out):
    messages: list[MessageOut]
    has_more: bool


@router.get(
    "/conversations/{conversation_id}/messages",
    tags=["messages"],
    exclude_none=True,
    **responses({200: MessageListOut}, errors=(401, 404, 422)),
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


@router.delete(
    "/conversations/{conversation_id}/messages/{seq}",
    tags=["messages"],
    exclude_none=True,
    **responses({200: MessageOut}, errors=(401, 403, 404, 422)),
)
def message_recall_api(request, conversation_id: ConversationId, seq: MessageSeq):
    """Recall (delete) a message: its sender within ``MESSAGE_RECALL_WINDOW_S``, or the group's
    creator at any time (anyone else, or past the window: 403). It stays as a tombstone
    (``deleted`` true, body erased, same seq); every member who had not read it loses one
    unread (and a mention) at once. Recalling it again answers 200 and changes nothing. A
    conversation I am not an active member of, or a seq it does not have: 404."""
    message, _ = services.message_recall(
        actor=request.auth.user, conversation_id=conversation_id, seq=seq
    )
    return message_out(message)


class MessageEditIn(Body):
    body: str = Field(min_length=1, max_length=settings.MESSAGE_BODY_MAX_CHARS)


@router.patch(
    "/conversations/{conversation_id}/messages/{seq}",
    tags=["messages"],
    exclude_none=True,
    **responses({200: MessageOut}, errors=(401, 403, 404, 409, 422), body=True),
)
def message_edit_api(
    request, conversation_id: ConversationId, seq: MessageSeq, payload: MessageEditIn
):
    """Edit a message's body: its sender only, within ``MESSAGE_RECALL_WINDOW_S`` (403
    otherwise); a recalled message: 409. Counts do not change; ``edit_count`` grows and
    ``edited_at`` is set; every member's devices learn the new body."""
    message = services.message_edit(
        actor=request.auth.user, conversation_id=conversation_id, seq=seq, body=payload.body
    )
    return message_out(message)


class ReadIn(Body):
    seq: Seq


BADGE_VERSION = Field(
    description="The user's version when the badge was read (read just before it): a client "
    "keeps the badge with the highest ``badge_version`` it has seen, from any answer, frame or "
    "push, and drops one that arrives late with a lower version."
)


class CountsOut(Out):
    unread: int
    badge: int
    badge_version: int = BADGE_VERSION


@router.post(
    "/conversations/{conversation_id}/read",
    tags=["counters"],
    **responses(
        {200: CountsOut},
        errors=(401, 404, 422),
        body=True,
        refusals="``seq`` is past the conversation's last seq.",
    ),
)
@decorate_view(direct)
def conversation_read_api(request, conversation_id: ConversationId, payload: ReadIn):
    """Mark read up to ``seq`` (never moves back); the new counts are in the answer."""
    unread, badge, version = services.conversation_read(
        user_id=request.auth.user_id,
        conversation_id=conversation_id,
        seq=payload.seq,
        versioned=True,
    )
    return {"unread": unread, "badge": badge, "badge_version": version}


class MuteIn(Body):
    muted: bool


class MuteOut(Out):
    conversation_id: int
    muted: bool
    unread: int
    badge: int
    badge_version: int = BADGE_VERSION


@router.post(
    "/conversations/{conversation_id}/mute",
    tags=["counters"],
    **responses({200: MuteOut}, errors=(401, 404, 422), body=True),
)
def conversation_mute_api(request, conversation_id: ConversationId, payload: MuteIn):
    """Mute or unmute: a muted conversation's unread count stays out of the badge."""
    membership = selectors.membership_get_active(
        user=request.auth.user, conversation_id=conversation_id
    )
    unread, badge, version = services.conversation_mute(
        membership=membership, muted=payload.muted, versioned=True
    )
    return {
        "conversation_id": conversation_id,
        "muted": payload.muted,
        "unread": unread,
        "badge": badge,
        "badge_version": version,
    }


class UnreadOut(Out):
    badge: int
    badge_version: int = BADGE_VERSION
    conversations: dict[str, int]
    mentions: dict[str, int] = Field(
        description="Unread mentions per conversation id, only conversations with at least "
        "one; not part of the badge, and counted in muted conversations too"
    )


@router.get("/unread", tags=["counters"], **responses({200: UnreadOut}, errors=(401,)))
def unread_get_api(request):
    """My badge and the unread count of each of my conversations."""
    counts, version = unread_with_version(request.auth.user.pk)
    return {
        "badge": counts.badge,
        "badge_version": version,
        "conversations": {str(cid): n for cid, n in sorted(counts.conversations.items())},
        "mentions": {str(cid): n for cid, n in sorted(counts.mentions.items())},
    }
