"""Reads of the messaging domain."""

from dataclasses import dataclass

from django.db.models import QuerySet
from django.db.models.functions import Coalesce

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
    conversation: Conversation
    membership: Membership
    unread: int
    unread_mentions: int = 0


def conversation_list(*, user: User) -> list[ConversationSummary]:
    """The user's conversations, newest activity first (latest message, or creation for a
    conversation without messages), with unread counts and unread mentions from Redis."""
    memberships = (
        Membership.objects.select_related("conversation")
        .filter(user=user, left_at__isnull=True)
        .annotate(activity=Coalesce("conversation__last_message_at", "conversation__created_at"))
        .order_by("-activity", "-conversation_id")
    )
    counts = counters_get(user_id=user.pk)
    return [
        ConversationSummary(
            conversation=m.conversation,
            membership=m,
            unread=counts.conversations.get(m.conversation_id, 0),
            unread_mentions=counts.mentions.get(m.conversation_id, 0),
        )
        for m in memberships
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
        "id": message.pk,
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
