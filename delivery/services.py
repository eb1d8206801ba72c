"""What happens to every member when something commits. imcore's services tell delivery what
happened, after their commit (as Zulip's actions do with ``send_event_on_commit``), and
delivery decides who is told what, calling its sinks:

- :mod:`counters` (unread counts and badge),
- :mod:`offline` (each user's offline store of sync entries, and live pokes to online devices),
- :mod:`offline.push` (push notifications to offline devices).

The sinks have small service APIs and never import delivery. Every call here is idempotent
(keyed by message seq, read seq or membership rev), so a client retrying a request after a
503 repairs what the first try could not write.

- A **message** goes through the write path ``DELIVERY_WRITE_PATH``
  (:func:`delivery_message_committed`): the aggregation pipeline (default;
  :mod:`delivery.pipeline`), celery-batches, or the per-message fan-out task. Each ends
  in one counter call and one offline-store call per member, and a push for members whose
  badge went up.
- A **read** moves the reader's counters at once, records a ``read`` entry and sends a silent
  badge push (:func:`delivery_read_moved`).
- A **join, leave or mute** updates the members' counters and records an entry for each
  (:func:`delivery_memberships_changed`).
"""

import time
from collections.abc import Sequence

from django.conf import settings

from counters.services import (
    counters_count_messages,
    counters_mark_read,
    counters_memberships_changed,
)
from imcore.models import Conversation, Membership
from offline.push import push_badge_changed
from offline.services import (
    offline_record_memberships,
    offline_record_messages,
    offline_record_read,
)

from .mentions import MentionIndex, mention_event


def delivery_message_committed(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
) -> None:
    """A message was committed (or a client repeated its send; the event is idempotent).
    ``DELIVERY_WRITE_PATH`` picks the aggregation pipeline (default: one queue event per
    message), one celery-batches task message per message (``batches``: buffered and folded in
    the worker), or the per-message fan-out task (``fanout``, kept for comparison). The
    message's ``mentions`` (user ids) and ``mention_all`` travel with it on each path, only
    when it has them."""
    extra = (
        {"mentions": list(mentions), "mention_all": bool(mention_all)}
        if mentions or mention_all
        else {}
    )
    if settings.DELIVERY_WRITE_PATH == "fanout":
        from .tasks import fanout_message

        fanout_message.delay(conversation_id=conversation_id, seq=seq, sender_id=sender_id, **extra)
    elif settings.DELIVERY_WRITE_PATH == "batches":
        from .tasks import batch_message

        batch_message.delay(
            conversation_id=conversation_id,
            seq=seq,
            sent_ms=int(time.time() * 1000),
            **({"sender_id": sender_id, **extra} if extra else {}),
        )
    else:
        from .pipeline import delivery_enqueue

        delivery_enqueue(conversation_id=conversation_id, seq=seq, sender_id=sender_id, **extra)


def delivery_sender_read(*, user_id: int, conversation_id: int, seq: int) -> None:
    """Sending marks the conversation read for the sender up to its message, at once (the
    message entry tells the sender's other devices; no entry or push of its own)."""
    counters_mark_read(user_id=user_id, conversation_id=conversation_id, read_seq=seq, last_seq=seq)


def delivery_fanout(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int | None = None,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
) -> int:
    """Deliver message ``seq`` to every active member at once: count it for everyone but the
    sender (with the mention for the users it mentions), record it in every member's offline
    store (the sender's too), push to those whose badge went up. Returns how many users were
    counted."""
    members = list(
        Membership.objects.filter(
            conversation_id=conversation_id, left_at__isnull=True
        ).values_list("user_id", "last_read_seq")
    )
    counted = [uid for uid, _ in members if uid != sender_id]
    mentioned = MentionIndex(
        [
            mention_event(
                conversation_id,
                seq,
                sender_id=sender_id,
                mentions=mentions,
                mention_all=mention_all,
            )
        ]
    )
    deltas = counters_count_messages(
        [(uid, mentioned.counter_pairs(uid, [(conversation_id, seq)])) for uid in counted]
    )
    offline_record_messages([(uid, [(conversation_id, seq, rs)]) for uid, rs in members])
    push_badge_changed(
        user_ids=[uid for uid, d in zip(counted, deltas, strict=True) if d and d > 0], alert=True
    )
    return len(counted)


def delivery_read_moved(
    *, user_id: int, conversation_id: int, seq: int, last_seq: int
) -> tuple[int, int]:
    """A committed mark-read: the counters move at once, the user's other devices get a
    ``read`` entry and a silent badge push. Returns ``(unread, badge)``."""
    counts = counters_mark_read(
        user_id=user_id, conversation_id=conversation_id, read_seq=seq, last_seq=last_seq
    )
    offline_record_read(user_id=user_id, conversation_id=conversation_id, seq=seq)
    push_badge_changed(user_ids=[user_id], alert=False)
    return counts


def delivery_memberships_changed(
    *,
    memberships: list[Membership],
    conversation: Conversation,
    last_seq: int,
    change: str,
    joined: set[int] | None = None,
) -> None:
    """Committed joins (``change="join"``), leaves (``"leave"``) or mutes (``"mute"``) of one
    conversation's members: their counters, an entry in each member's offline store, and for a
    mute a silent badge push (the badge may have changed). ``joined`` names the users who
    joined in this call (see :func:`offline.services.offline_record_memberships`)."""
    counters_memberships_changed(memberships=memberships, last_seq=last_seq)
    offline_record_memberships(
        memberships=memberships,
        conversation=conversation,
        last_seq=last_seq,
        change=change,
        joined=joined,
    )
    if change == "mute":
        push_badge_changed(user_ids=[m.user_id for m in memberships], alert=False)
