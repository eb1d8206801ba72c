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
- A **recall** or an **edit** (:func:`delivery_message_recalled`, :func:`delivery_message_edited`)
  reaches every member: in small groups a counter call (recall) and an entry per member, in
  channel-mode groups one record of the conversation and one relay to its connected sockets.
- A **join, leave or mute** updates the members' counters and records an entry for each
  (:func:`delivery_memberships_changed`).
"""

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from django.conf import settings
from django.db import transaction

from counters.redis import execute, get_redis, scripts_call
from counters.services import (
    counters_channel_committed,
    counters_channel_mentions_all,
    counters_channel_raise,
    counters_count_messages,
    counters_mark_read,
    counters_memberships_changed,
    counters_message_recalled,
    counters_read_done,
    counters_read_queue,
    counters_send_calls,
    counters_send_done,
)
from imcore.models import Conversation, Membership, Message
from offline.push import push_badge_changed, push_devices_badge_changed
from offline.selectors import badge_version
from offline.services import (
    offline_channel_members_changed,
    offline_channel_message,
    offline_channel_op,
    offline_record_memberships,
    offline_record_message_ops,
    offline_record_messages,
    offline_record_read,
    offline_version_done,
    offline_version_queue,
)

from . import keys
from .failpoints import failpoint
from .mentions import MentionIndex, mention_event


def delivery_message_committed(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
    mode: str = Conversation.Mode.AGGREGATE,
) -> None:
    """A message was committed (or a client repeated its send; the event is idempotent), in a
    conversation of ``mode`` (as the send's row lock saw it). In channel mode it costs O(1):
    :func:`delivery_channel_message`. In aggregate mode ``DELIVERY_WRITE_PATH`` picks the
    aggregation pipeline (default: one queue event per message), one celery-batches task
    message per message (``batches``: buffered and folded in the worker), or the per-message
    fan-out task (``fanout``, kept for comparison). The message's ``mentions`` (user ids) and
    ``mention_all`` travel with it on each path, only when it has them."""
    if mode in Conversation.CHANNEL_SEND_MODES:
        delivery_channel_message(
            conversation_id=conversation_id,
            seq=seq,
            sender_id=sender_id,
            mentions=mentions,
            mention_all=mention_all,
        )
    if mode not in Conversation.PIPELINE_SEND_MODES:
        return
    # (A conversion under way does both: every member is right whichever form its counters
    # are in.)
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


def delivery_channel_message(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int | None = None,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
) -> None:
    """A message in a channel-mode group: raise the conversation's top (one script call; every
    member's unread is top - read pointer), relay it to the members' connected sockets (one
    publish), and count and alert the personally mentioned users only. No write per member:
    the offline devices' badges follow from :func:`delivery_channel_badges` once per
    ``PUSH_INTERVAL_S``."""
    counters_channel_committed(
        conversation_id=conversation_id,
        seq=seq,
        sender_id=sender_id,
        mentions=mentions,
        mention_all=mention_all,
    )
    offline_channel_message(conversation_id=conversation_id, seq=seq)
    if mentions and not mention_all:
        push_badge_changed(user_ids=[u for u in mentions if u != sender_id], alert=True)


def delivery_message_sent(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
    mode: str = Conversation.Mode.AGGREGATE,
) -> None:
    """A sender's message was committed (or its send repeated): :func:`delivery_message_committed`
    and :func:`delivery_sender_read`, with every Redis write they make in one round trip: the
    sender's read, in channel form the channel's top (and the personal mentions' counts), on
    the aggregation pipeline the shard's enqueue (a conversion under way does both). The
    relay to connected sockets (a channel-layer publish) and the pushes follow it. The
    ``batches`` and ``fanout`` write paths and the strategies other than ``lua`` make the same
    calls one by one. On Redis Cluster the round trip is one per node the keys live on (the
    sender's ``{u:}``, the shard's ``{cq:}`` and the channel's ``{c:}`` tags)."""
    channel = mode in Conversation.CHANNEL_SEND_MODES
    pipeline = mode in Conversation.PIPELINE_SEND_MODES
    calls = None
    if not pipeline or settings.DELIVERY_WRITE_PATH == "pipeline":
        calls = counters_send_calls(
            conversation_id=conversation_id,
            seq=seq,
            sender_id=sender_id,
            mentions=mentions,
            mention_all=mention_all,
            channel=channel,
        )
    if calls is None:
        delivery_message_committed(
            conversation_id=conversation_id,
            seq=seq,
            sender_id=sender_id,
            mentions=mentions,
            mention_all=mention_all,
            mode=mode,
        )
        delivery_sender_read(user_id=sender_id, conversation_id=conversation_id, seq=seq)
        return
    from .pipeline import enqueue_call, enqueued

    counted = len(calls)
    if pipeline:
        calls.append(
            enqueue_call(
                conversation_id=conversation_id,
                seq=seq,
                sender_id=sender_id,
                mentions=mentions,
                mention_all=mention_all,
            )
        )
    replies = scripts_call(calls)
    counters_send_done(
        replies[:counted], conversation_id=conversation_id, seq=seq, sender_id=sender_id
    )
    if pipeline:
        enqueued(conversation_id=conversation_id, flush=replies[-1])
    if channel:
        offline_channel_message(conversation_id=conversation_id, seq=seq)
        if mentions and not mention_all:
            push_badge_changed(user_ids=[u for u in mentions if u != sender_id], alert=True)


def delivery_sender_read(*, user_id: int, conversation_id: int, seq: int) -> None:
    """Sending marks the conversation read for the sender up to its message, at once (the
    message entry tells the sender's other devices; no entry or push of its own)."""
    counters_mark_read(
        user_id=user_id, conversation_id=conversation_id, read_seq=seq, last_seq=seq, answer=False
    )


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
    *,
    user_id: int,
    conversation_id: int,
    seq: int,
    last_seq: int,
    push_devices: list[int],
    versioned: bool = False,
) -> tuple[int, ...]:
    """A committed mark-read: the counters move at once, the user's other devices get a
    ``read`` entry and a silent badge push (to ``push_devices``, the user's devices with a
    pushkey, read with the mark-read). Returns ``(unread, badge)``, or with ``versioned``
    ``(unread, badge, badge_version)``: the user's version, read before the counters move, so
    the badge reflects every change up to it.

    Under the ``lua`` strategy the three go to Redis in one round trip, in that order (the
    version's ``HMGET``, the read script and the hash, the entry's script; all in the user's
    slot), where they took three. Where Redis did not hold the user's counters or sync state
    (nothing of that part was written), that part is done again the slow way: the counters
    rebuilt, the sync state loaded, and after a version had to be loaded the counts read again
    after it."""
    read = {"user_id": user_id, "conversation_id": conversation_id, "read_seq": seq}
    pipe = get_redis().pipeline(transaction=False)
    if versioned:
        offline_version_queue(pipe, user_id=user_id)
    if counters_read_queue(pipe, **read, last_seq=last_seq):
        entry = offline_record_read(
            user_id=user_id, conversation_id=conversation_id, seq=seq, pipe=pipe
        )
        replies = execute(pipe)
        version = offline_version_done(replies.pop(0), user_id=user_id) if versioned else None
        counts = counters_read_done(replies[:2], **read, last_seq=last_seq)
        entry(replies[2:])
        if versioned and version is None:
            version = badge_version(user_id)  # loaded now: the counts are read again after it
            counts = counters_mark_read(**read, last_seq=last_seq)
    else:
        version = badge_version(user_id) if versioned else None
        counts = counters_mark_read(**read, last_seq=last_seq)
        offline_record_read(user_id=user_id, conversation_id=conversation_id, seq=seq)
    push_devices_badge_changed(devices=[(pk, user_id) for pk in push_devices], alert=False)
    return (*counts, version) if versioned else counts


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
    joined in this call (see :func:`offline.services.offline_record_memberships`).
    ``conversation`` is its row as committed with the change (its mode decides the form of
    the members' counters)."""
    counters_memberships_changed(
        memberships=memberships,
        last_seq=last_seq,
        mode_gen=conversation.mode_gen,
        channel=conversation.mode in Conversation.CHANNEL_FORM_MODES,
    )
    offline_record_memberships(
        memberships=memberships,
        conversation=conversation,
        last_seq=last_seq,
        change=change,
        joined=joined,
    )
    if change == "mute":
        push_badge_changed(user_ids=[m.user_id for m in memberships], alert=False)


# ---- recall and edit -----------------------------------------------------------------------


def _active_members(conversation_id: int) -> list[int]:
    return list(
        Membership.objects.filter(
            conversation_id=conversation_id, left_at__isnull=True
        ).values_list("user_id", flat=True)
    )


def delivery_message_recalled(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int,
    mentions: Sequence[int] = (),
    mode: str = Conversation.Mode.AGGREGATE,
) -> None:
    """A committed recall of message ``seq`` (or a repeated one: every step is idempotent),
    in a conversation of ``mode`` (as the recall's row lock saw it):

    - counters: the conversation's record of recalls (O(1); in channel form every reader's
      unread counts against it), and where members' counters may be in aggregate form
      (a small group, or a conversion under way) one seq-keyed call per active member,
      pipelined; in channel mode only the users it mentioned (their mention goes);
    - sync: a ``recall`` entry in every active member's offline store (small groups), or a
      relay to the group's connected sockets (channel mode; ``/sync``'s ``channels`` item
      moves, and history shows the tombstone);
    - a silent badge push to the members whose badge dropped."""
    pipeline = mode in Conversation.PIPELINE_SEND_MODES
    members = _active_members(conversation_id) if pipeline else []
    users = members if pipeline else [u for u in dict.fromkeys(mentions) if u != sender_id]
    deltas = counters_message_recalled(
        conversation_id=conversation_id,
        seq=seq,
        user_ids=users,
        channel=mode in Conversation.CHANNEL_SEND_MODES,
    )
    if pipeline:
        offline_record_message_ops(
            user_ids=members, conversation_id=conversation_id, seq=seq, op="recall"
        )
    if mode in Conversation.CHANNEL_SEND_MODES:
        offline_channel_op(conversation_id=conversation_id, seq=seq, op="recall")
    dropped = [u for u, d in zip(users, deltas, strict=True) if d and d < 0]
    if dropped:
        push_badge_changed(user_ids=dropped, alert=False)


def delivery_message_edited(*, message: Message, mode: str = Conversation.Mode.AGGREGATE) -> None:
    """A committed edit: no count changes; every member's devices learn the new body (an
    ``edit`` entry in each active member's store in a small group, a relay to the connected
    sockets in channel mode; history and the gap snapshot show the edited body)."""
    cid = message.conversation_id
    if mode in Conversation.PIPELINE_SEND_MODES:
        offline_record_message_ops(
            user_ids=_active_members(cid),
            conversation_id=cid,
            seq=message.seq,
            op="edit",
            edit_count=message.edit_count,
        )
    if mode in Conversation.CHANNEL_SEND_MODES:
        offline_channel_op(conversation_id=cid, seq=message.seq, op="edit")


# ---- channel mode: conversions -------------------------------------------------------------


def delivery_group_size_changed(*, conversation: Conversation, members: int) -> bool:
    """After a committed join or leave: a group that crossed the line (up to
    ``LARGE_GROUP_MIN_MEMBERS``, or down to ``LARGE_GROUP_EXIT_MEMBERS``) converts in a
    task, as does one whose conversion was cut short. Returns whether one was sent."""
    if _conversion_target(conversation, members) is None:
        return False
    from .tasks import convert_conversation

    convert_conversation.delay(conversation_id=conversation.pk)
    return True


def _conversion_target(conversation: Conversation, members: int) -> str | None:
    Mode = Conversation.Mode
    if conversation.mode in (Mode.TO_CHANNEL, Mode.TO_AGGREGATE):
        return conversation.mode  # resume a conversion cut short
    if conversation.kind != Conversation.Kind.GROUP:
        return None
    if conversation.mode == Mode.AGGREGATE and members >= settings.LARGE_GROUP_MIN_MEMBERS:
        return Mode.TO_CHANNEL
    if conversation.mode == Mode.CHANNEL and members <= settings.LARGE_GROUP_EXIT_MEMBERS:
        return Mode.TO_AGGREGATE
    return None


def delivery_convert(*, conversation_id: int, force: str | None = None) -> str | None:
    """Convert a group between aggregate and channel mode, if its size says so (or to
    ``force``: ``channel`` or ``aggregate``, for the admin and tests). O(members) once:

    1. Under the conversation's row lock, the mode becomes ``to_channel`` (or
       ``to_aggregate``) with a new generation. From then on every send both enqueues its
       pipeline event and raises the channel's top, so each member is right whichever form its
       counters are in.
    2. The channel's top is raised to ``last_seq`` as committed after step 1 (every send
       before it is at or below that).
    3. Every active member's row is sent again with the new generation and form, in pipelined
       chunks (the ``member`` script: a row of an older rev only changes the form, and a
       membership call of an older generation never changes it back). Into the aggregate
       form, the channel's mention_all seqs join each member's own mentions.
    4. The mode becomes ``channel`` (or ``aggregate``) if nobody started another conversion.

    A crash between 1 and 4 leaves the mode ``to_*``: sends stay right, and the next join or
    leave (or ``delivery_convert`` again) resumes it. Returns the mode reached, or None."""
    Mode = Conversation.Mode
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().get(pk=conversation_id)
        members = Membership.objects.filter(
            conversation_id=conversation_id, left_at__isnull=True
        ).count()
        if force is None:
            target = _conversion_target(conversation, members)
        elif force == conversation.mode or conversation.kind != Conversation.Kind.GROUP:
            target = None
        else:
            target = Mode.TO_CHANNEL if force == Mode.CHANNEL else Mode.TO_AGGREGATE
        if target is None:
            return None
        if target != conversation.mode:
            conversation.mode = target
            conversation.mode_gen += 1
            conversation.save(update_fields=["mode", "mode_gen"])
    gen = conversation.mode_gen
    channel = target == Mode.TO_CHANNEL
    failpoint("convert.after_mode")
    last_seq = Conversation.objects.values_list("last_seq", flat=True).get(pk=conversation_id)
    recalled = list(
        Message.objects.filter(conversation_id=conversation_id, deleted=True).values_list(
            "seq", flat=True
        )
    )
    counters_channel_raise(conversation_id=conversation_id, top=last_seq, recalled=recalled)
    mentions_all = () if channel else counters_channel_mentions_all(conversation_id=conversation_id)
    recalled = () if channel else recalled
    chunk: list[Membership] = []
    for membership in Membership.objects.filter(
        conversation_id=conversation_id, left_at__isnull=True
    ).iterator(chunk_size=settings.LARGE_GROUP_CONVERT_CHUNK):
        chunk.append(membership)
        if len(chunk) >= settings.LARGE_GROUP_CONVERT_CHUNK:
            _convert_members(chunk, last_seq, gen, channel, mentions_all, recalled)
            chunk = []
            failpoint("convert.after_chunk")
    _convert_members(chunk, last_seq, gen, channel, mentions_all, recalled)
    failpoint("convert.before_done")
    final = Mode.CHANNEL if channel else Mode.AGGREGATE
    done = Conversation.objects.filter(pk=conversation_id, mode=target, mode_gen=gen).update(
        mode=final
    )
    return final if done else None


def _convert_members(
    chunk, last_seq: int, gen: int, channel: bool, mentions_all, recalled=()
) -> None:
    if chunk:
        counters_memberships_changed(
            memberships=chunk,
            last_seq=last_seq,
            mode_gen=gen,
            channel=channel,
            mentions_all=mentions_all,
            recalled=recalled,
        )
        offline_channel_members_changed(
            user_ids=[m.user_id for m in chunk],
            conversation_id=chunk[0].conversation_id,
            channel=channel,
        )


# ---- channel mode: badges of offline devices -----------------------------------------------


def delivery_channel_badges(*, now_ms: int | None = None) -> int:
    """Celery beat, every ``PUSH_INTERVAL_S``: the channel-mode groups that had messages since
    the last run schedule a push for their unmuted members' offline devices with a pushkey
    (the push throttle coalesces, and a silent one goes only if the badge changed). A group
    that had a ``mention_all`` makes them alerts. Per member per interval, never per message.
    Returns how many devices were scheduled."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    client = get_redis()
    since_ms = client.getset(keys.CHANNEL_BADGES_SINCE, now_ms)
    since = datetime.fromtimestamp(
        (int(since_ms) if since_ms else now_ms - settings.PUSH_INTERVAL_S * 1000) / 1000, UTC
    )
    cids = list(
        Conversation.objects.filter(
            mode__in=Conversation.CHANNEL_SEND_MODES, last_message_at__gte=since
        ).values_list("pk", flat=True)
    )
    if not cids:
        return 0
    alerting = set(
        Message.objects.filter(
            conversation_id__in=cids, mention_all=True, created_at__gte=since
        ).values_list("conversation_id", flat=True)
    )
    scheduled = 0
    for alert, group in ((True, alerting), (False, set(cids) - alerting)):
        if group:
            users = (
                Membership.objects.filter(
                    conversation_id__in=group,
                    left_at__isnull=True,
                    muted=False,
                    user__device__pushkey__gt="",
                )
                .values_list("user_id", flat=True)
                .distinct()
            )
            scheduled += push_badge_changed(user_ids=list(users), alert=alert)
    return scheduled
