"""The messaging domain: users, conversations, memberships, messages, devices.

PostgreSQL is the truth. Two facts make the unread counters derivable from it:

- ``Message.seq`` is dense per conversation (1, 2, 3, ... with no gap), because a send bumps
  ``Conversation.last_seq`` with ``UPDATE ... RETURNING`` in the same transaction that
  inserts the message; a failed insert rolls the bump back.
- ``Membership.last_read_seq`` only grows.

So ``unread(u, c) = c.last_seq - m.last_read_seq - (recalled messages above
m.last_read_seq)`` for an active membership ``m``: a recalled message (a tombstone, see
``Message.deleted``) keeps its seq and counts for nobody.
"""

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.db.models import Q


class User(AbstractUser):
    """A person. Kept as Django's user so the admin and password hashing come for free."""


class Conversation(models.Model):
    class Kind(models.TextChoices):
        DIRECT = "direct", "Direct"
        GROUP = "group", "Group"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    title = models.CharField(max_length=200, blank=True, default="")
    # "<smaller user id>:<larger user id>" for direct conversations, so a pair has one.
    direct_key = models.CharField(max_length=64, null=True, blank=True, unique=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # seq of the newest message; 0 while there is none.
    last_seq = models.BigIntegerField(default=0, editable=False)
    # when the newest message was stored (orders "my conversations" by activity)
    last_message_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Mode(models.TextChoices):
        """How a message reaches the members (see ``docs/channel-mode.md``). ``aggregate``: the
        delivery pipeline counts it for every member. ``channel`` (large groups): the send only
        raises the conversation's top, and each member's unread is top - read pointer. The two
        ``to_*`` modes are a conversion under way: sends do both, so every member is right in
        whichever form its counters are."""

        AGGREGATE = "aggregate", "Aggregate"
        TO_CHANNEL = "to_channel", "Converting to channel"
        CHANNEL = "channel", "Channel"
        TO_AGGREGATE = "to_aggregate", "Converting to aggregate"

    mode = models.CharField(
        max_length=16, choices=Mode.choices, default=Mode.AGGREGATE, editable=False
    )
    # Raised by every conversion: a member's counters take the form (channel or aggregate) of
    # the highest generation they were told about, whatever order the calls arrive in.
    mode_gen = models.BigIntegerField(default=0, editable=False)

    CHANNEL_FORM_MODES = frozenset({Mode.TO_CHANNEL, Mode.CHANNEL})  # members' counters form
    CHANNEL_SEND_MODES = frozenset({Mode.TO_CHANNEL, Mode.CHANNEL, Mode.TO_AGGREGATE})
    PIPELINE_SEND_MODES = frozenset({Mode.AGGREGATE, Mode.TO_CHANNEL, Mode.TO_AGGREGATE})

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(kind="direct", direct_key__isnull=False)
                | Q(kind="group", direct_key__isnull=True),
                name="conversation_direct_key_iff_direct",
            ),
            models.CheckConstraint(
                condition=Q(last_seq__gte=0), name="conversation_last_seq_gte_0"
            ),
        ]

    def __str__(self) -> str:
        return self.title or f"{self.kind} #{self.pk}"

    @staticmethod
    def direct_key_for(user_a_id: int, user_b_id: int) -> str:
        low, high = sorted((user_a_id, user_b_id))
        return f"{low}:{high}"


class Membership(models.Model):
    """A user's place in a conversation. A row is kept after leaving (``left_at`` set) so a
    rejoin reuses it; ``rev`` grows on every join, leave and mute change and lets the counter
    store apply those changes in commit order whatever order they reach Redis in."""

    # No index of its own: membership_unique (user, conversation) serves look-ups by user.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, db_index=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE)
    last_read_seq = models.BigIntegerField(default=0)
    muted = models.BooleanField(default=False)
    joined_at = models.DateTimeField()
    left_at = models.DateTimeField(null=True, blank=True)
    rev = models.BigIntegerField(default=1)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "conversation"], name="membership_unique"),
            models.CheckConstraint(
                condition=Q(last_read_seq__gte=0), name="membership_last_read_seq_gte_0"
            ),
        ]
        indexes = [
            models.Index(
                fields=["conversation", "user"],
                condition=Q(left_at__isnull=True),
                name="membership_active_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"user {self.user_id} in conversation {self.conversation_id}"

    @property
    def is_active(self) -> bool:
        return self.left_at is None


class Message(models.Model):
    # Neither foreign key has an index of its own: the unique constraints below lead with
    # each (conversation, seq; sender, client_msg_id), and every send wrote two more index
    # entries for nothing (issue 14).
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, db_index=False)
    seq = models.BigIntegerField()
    sender = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, db_index=False)
    client_msg_id = models.CharField(max_length=64)
    body = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)
    # Users the message mentions (active members when sent; sorted, no duplicates), and
    # whether it mentions every member (group creators only). A mention counts for a member
    # while unread: seq > their last_read_seq, and not their own message.
    mentions = ArrayField(models.BigIntegerField(), default=list, blank=True)
    mention_all = models.BooleanField(default=False)
    # A recalled message is a tombstone: it keeps its seq (seqs stay dense), its body is
    # erased, and it counts for nobody (unread and mentions skip it). Edits keep a count and
    # the time of the last one.
    deleted = models.BooleanField(default=False, db_default=False)
    deleted_at = models.DateTimeField(null=True, blank=True)
    edit_count = models.IntegerField(default=0, db_default=0)
    edited_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            # Recalls are rare: the rebuild finds the recalled seqs above a read pointer here.
            models.Index(
                fields=["conversation", "seq"],
                condition=Q(deleted=True),
                name="message_deleted_idx",
            ),
            # Mentions are rare: the rebuild finds a user's with these, not by scanning every
            # unread message.
            GinIndex(fields=["mentions"], name="message_mentions_gin"),
            models.Index(
                fields=["conversation", "seq"],
                condition=Q(mention_all=True),
                name="message_mention_all_idx",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "seq"], name="message_conversation_seq"
            ),
            models.UniqueConstraint(
                fields=["sender", "client_msg_id"], name="message_sender_client_msg_id"
            ),
            models.CheckConstraint(condition=Q(seq__gte=1), name="message_seq_gte_1"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} in conversation {self.conversation_id}"


class Device(models.Model):
    """A logged-in device. The bearer token is shown once at login; only its SHA-256 is kept."""

    class Platform(models.TextChoices):
        IOS = "ios", "iOS"
        ANDROID = "android", "Android"
        WEB = "web", "Web"
        DESKTOP = "desktop", "Desktop"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    device_id = models.CharField(max_length=64)
    platform = models.CharField(max_length=16, choices=Platform.choices)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    # Cumulative sync ack: the device holds every entry up to this version. Written in
    # batches by offline.flush_acks (newer acks may still wait in Redis); only grows.
    acked_version = models.BigIntegerField(default=0, editable=False)
    # Push notifications while offline (Matrix push gateway pushkey; empty: no pushes).
    pushkey = models.CharField(max_length=512, blank=True, default="")
    push_app_id = models.CharField(max_length=64, blank=True, default="")
    pushkey_updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "device_id"], name="device_user_device_id"),
        ]

    def __str__(self) -> str:
        return f"{self.device_id} ({self.platform}) of user {self.user_id}"


__all__ = ["Conversation", "Device", "Membership", "Message", "User"]
