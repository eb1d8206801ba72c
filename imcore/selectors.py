"""Reads of the messaging domain."""

from dataclasses import dataclass

from django.db import connection
from django.db.models import QuerySet

from counters.selectors import counters_get

from .errors import NotFound
from .models import Conversation, Device, Membership, Message, User


def device_get(*, user: User, device_id: str) -> Device:
    """One of the user's devices by its ``device_id``, or 404: another user's device is
    reported exactly like one that does not exist."""
    device = Device.objects.select_related("user").filter(user=user, device_id=device_id).first()
    if device is None:
        raise NotFound(f"device {device_id!r} not found")
    return device


def membership_get_active(*, user: User, conversation_id: int) -> Membership:
    """The caller's active membership, or 404: a conversation the user does not belong to is
    reported exactly like one that does not exist."""
    membership = (
        Membership.objects.select_related("conversation")
        .filter(user=user, conversation_id=conversation_id, left_at__isnull=True)
        .first()
    )
    if membership is None:
        raise NotFound(f"conversation {conversation_id} not found")
    return membership


def membership_get_any(*, user: User, conversation_id: int) -> Membership:
    """The user's membership, active or left (404 if the user never belonged): a member may
    repeat their own leave."""
    membership = (
        Membership.objects.select_related("conversation")
        .filter(user=user, conversation_id=conversation_id)
        .first()
    )
    if membership is None:
        raise NotFound(f"conversation {conversation_id} not found")
    return membership


def conversation_member_ids(*, conversation: Conversation) -> list[int]:
    return list(
        Membership.objects.filter(conversation=conversation, left_at__isnull=True)
        .order_by("user_id")
        .values_list("user_id", flat=True)
    )


@dataclass(frozen=True)
class ConversationSummary:
    """One line of a user's conversation list, as ``GET /conversations`` shows it."""

    id: int
    kind: str
    title: str
    last_seq: int
    last_read_seq: int
    muted: bool
    unread: int
    unread_mentions: int


# The list is on every app start and every refresh: one statement written once, rather than an
# ORM query compiled on each call (which cost more CPU than the query itself, README 3d).
_CONVERSATION_LIST_SQL = """
SELECT c.id, c.kind, c.title, c.last_seq, m.last_read_seq, m.muted
FROM imcore_membership m JOIN imcore_conversation c ON c.id = m.conversation_id
WHERE m.user_id = %s AND m.left_at IS NULL
ORDER BY COALESCE(c.last_message_at, c.created_at) DESC, c.id DESC
"""


def conversation_list(*, user_id: int) -> list[ConversationSummary]:
    """The user's conversations, newest activity first (latest message, or creation for a
    conversation without messages), with unread counts and unread mentions from Redis."""
    with connection.cursor() as cursor:
        cursor.execute(_CONVERSATION_LIST_SQL, [user_id])
        rows = cursor.fetchall()
    counts = counters_get(user_id=user_id)
    return [
        ConversationSummary(
            *row,
            unread=counts.conversations.get(row[0], 0),
            unread_mentions=counts.mentions.get(row[0], 0),
        )
        for row in rows
    ]


def message_list(*, conversation: Conversation, after_seq: int, limit: int) -> QuerySet[Message]:
    return Message.objects.filter(conversation=conversation, seq__gt=after_seq).order_by("seq")[
        :limit
    ]


def message_fields(message: Message) -> dict:
    """A message as the API shows it (``created_at`` and ``edited_at`` left datetimes for the
    caller to encode). A recalled message is a tombstone: ``deleted`` true, ``body`` empty,
    no mentions. ``edited_at`` only once edited."""
    return {
        "id": message.id,
        "conversation_id": message.conversation_id,
        "seq": message.seq,
        "sender_id": message.sender_id,
        "body": message.body,
        "client_msg_id": message.client_msg_id,
        "created_at": message.created_at,
        "mentions": [] if message.deleted else list(message.mentions),
        "mention_all": message.mention_all and not message.deleted,
        "deleted": message.deleted,
        "edit_count": message.edit_count,
        **({"edited_at": message.edited_at} if message.edited_at is not None else {}),
    }
