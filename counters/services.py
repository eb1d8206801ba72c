"""Writes of the counters app, a sink of :mod:`delivery`: its callers (delivery, tasks, admin,
commands) use only these functions; the strategy and the key layout stay behind them. It never
imports delivery/."""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache

from django.contrib.auth import get_user_model

from imcore.models import Conversation, Membership, Message

from . import keys
from .redis import ScriptCall, execute, get_redis, store_id
from .scripts import CounterScripts
from .selectors import (
    UnreadCounts,
    channel_conversations,
    counters_truth_from_rows,
    counters_truth_rows,
    counts_with_channels,
)
from .strategies import LuaStrategy, get_strategy
from .transitions import CountersNotLoaded, CountersNotMember, MembershipRow

logger = logging.getLogger(__name__)

# Users whose truth is read in one query during a reconcile.
RECONCILE_CHUNK = 500


@dataclass
class CounterDiff:
    """What Redis held for one user before a rebuild, against the truth."""

    user_id: int
    was_loaded: bool
    badge: tuple[int, int] | None = None  # (redis, truth) when they differed
    conversations: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)
    mentions: dict[int, tuple[int, int]] = field(default_factory=dict)  # unread mentions

    @property
    def differed(self) -> bool:
        return self.badge is not None or bool(self.conversations) or bool(self.mentions)


@dataclass
class ReconcileReport:
    users_checked: int = 0
    users_not_loaded: int = 0
    diffs: list[CounterDiff] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.users_checked} users checked, {len(self.diffs)} differed from PostgreSQL, "
            f"{self.users_not_loaded} were not loaded in Redis"
        )


def counters_count_messages(items: Sequence[tuple[int, Sequence[tuple]]]) -> list:
    """Count messages: ``items`` = ``[(user_id, [(conversation_id, top seq)])]``, one counter
    call per user (pipelined for ``lua``); a user's top of a conversation only moves up, so
    counting a seq again changes nothing. An item may be ``(conversation_id, top seq, mention
    seqs)``: the seqs of the messages that mention the user, kept until read (a seq is counted
    once). Returns each user's badge change, in order."""
    return get_strategy().inc_many(items)


def counters_mark_read(
    *, user_id: int, conversation_id: int, read_seq: int, last_seq: int, answer: bool = True
) -> tuple[int, int] | None:
    """Apply a committed mark-read at once; returns ``(unread, badge)`` (None when not
    ``answer``: a sender's own read needs no answer, and skips reading the channel-form
    conversations the badge counts). Rebuilds the user's counters first when Redis does not
    hold them."""
    strategy = get_strategy()
    read = strategy.read_fetch if answer else strategy.read
    try:
        result = read(user_id, conversation_id, read_seq, last_seq)
    except (CountersNotLoaded, CountersNotMember):
        counters_rebuild(user_id=user_id)
        try:
            result = read(user_id, conversation_id, read_seq, last_seq)
        except CountersNotMember:
            # The user left between the read's commit and now: nothing of it is unread any
            # more.
            result = ((0, None), strategy.fetch(user_id))
    return _read_counts(result, conversation_id) if answer else None


def _read_counts(result, conversation_id: int) -> tuple[int, int]:
    """``(unread, badge)`` from a read's script reply and the hash read after it."""
    counts, fields = result
    if counts[1] is not None and not channel_conversations(fields):
        return counts
    # The badge counts the user's channel-form conversations too (and the unread of one in
    # channel form is against its channel's top).
    now = counts_with_channels(fields)
    return now.conversations.get(conversation_id, 0), now.badge


def counters_read_queue(
    pipe, *, user_id: int, conversation_id: int, read_seq: int, last_seq: int
) -> bool:
    """Queue :func:`counters_mark_read` (the script, then the user's hash: two commands) on a
    caller's pipeline (no MULTI), to go to Redis in one round trip with the caller's own
    commands; give its two replies to :func:`counters_read_done`. False under a strategy
    other than ``lua`` (nothing queued): call :func:`counters_mark_read` instead."""
    strategy = get_strategy()
    if not isinstance(strategy, LuaStrategy):
        return False
    strategy.read_fetch_queue(pipe, user_id, conversation_id, read_seq, last_seq)
    return True


def counters_read_done(
    replies: list, *, user_id: int, conversation_id: int, read_seq: int, last_seq: int
) -> tuple[int, int]:
    """:func:`counters_mark_read`'s answer from the replies of :func:`counters_read_queue`;
    when Redis did not hold the user's counters (nothing was written), as that function does:
    rebuilt, then read again."""
    try:
        result = get_strategy().read_fetch_result(replies)
    except (CountersNotLoaded, CountersNotMember):
        return counters_mark_read(
            user_id=user_id, conversation_id=conversation_id, read_seq=read_seq, last_seq=last_seq
        )
    return _read_counts(result, conversation_id)


def counters_send_calls(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
    channel: bool = False,
) -> list[ScriptCall] | None:
    """The counter writes of a message its sender has just sent, as script calls the caller
    sends in one round trip with its own (:func:`counters.redis.scripts_call`): in
    ``channel`` form what :func:`counters_channel_committed` writes, then the sender's read
    up to the message (as :func:`counters_mark_read` without an answer). Give their replies
    to :func:`counters_send_done`. None under a strategy other than ``lua`` (its writes are not
    script calls): then call those functions."""
    strategy = get_strategy()
    if not isinstance(strategy, LuaStrategy):
        return None
    calls = []
    if channel:
        calls.append(channel_scripts().channel_call(conversation_id, seq, mention_all=mention_all))
        if mentions and not mention_all:
            calls.extend(
                strategy.scripts.inc_call(uid, [(conversation_id, seq, (seq,))])
                for uid in dict.fromkeys(mentions)
                if uid != sender_id
            )
    # The read last, as before: the top is raised before the sender's pointer passes it.
    calls.append(strategy.scripts.read_call(sender_id, conversation_id, seq, seq))
    return calls


def counters_send_done(
    replies: Sequence, *, conversation_id: int, seq: int, sender_id: int
) -> None:
    """After :func:`counters_send_calls` ran (``replies``: its calls' replies): a sender whose
    counters Redis did not hold (or not as a member) is rebuilt from PostgreSQL and its read
    applied again."""
    try:
        CounterScripts.read_result(replies[-1])
    except (CountersNotLoaded, CountersNotMember):
        counters_mark_read(
            user_id=sender_id,
            conversation_id=conversation_id,
            read_seq=seq,
            last_seq=seq,
            answer=False,
        )


def counters_membership_changed(
    *, membership: Membership, last_seq: int, mode_gen: int = 0, channel: bool = False
) -> None:
    """Apply a committed join, leave, mute or unmute (carries the membership's ``rev``)."""
    counters_memberships_changed(
        memberships=[membership], last_seq=last_seq, mode_gen=mode_gen, channel=channel
    )


def counters_memberships_changed(
    *,
    memberships: Sequence[Membership],
    last_seq: int,
    mode_gen: int = 0,
    channel: bool = False,
    mentions_all: Sequence[int] = (),
    recalled: Sequence[int] = (),
) -> None:
    """The same for many memberships of one conversation, pipelined (a 5,000-member group is
    created in a few round trips, not 5,000). ``mode_gen`` and ``channel`` are the
    conversation's mode generation and form when the change committed (a conversion sends
    every member's row with its new generation); ``mentions_all``, the channel's mention_all
    seqs that a conversion to the aggregate form folds into each member's own mentions;
    ``recalled``, the conversation's recalled seqs, which it folds into each member's own."""
    get_strategy().member_many(
        [
            (
                m.user_id,
                MembershipRow(
                    conversation_id=m.conversation_id,
                    rev=m.rev,
                    active=m.left_at is None,
                    muted=m.muted,
                    read_seq=m.last_read_seq,
                    top=last_seq,
                    mentions=tuple(s for s in mentions_all if s > m.last_read_seq),
                    gen=mode_gen,
                    channel=channel,
                    recalled=tuple(s for s in recalled if s > m.last_read_seq),
                ),
            )
            for m in memberships
        ]
    )


def counters_channel_committed(
    *,
    conversation_id: int,
    seq: int,
    sender_id: int | None = None,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
) -> None:
    """A message committed in a conversation in channel form (or converting): raise its top
    (one script call, whatever the group's size); a ``mention_all`` joins the channel's
    record, counted against each reader's pointer. Personal mentions are written to the
    mentioned users only (one call each, pipelined). Idempotent."""
    channel_scripts().channel(conversation_id, seq, mention_all=mention_all)
    if mentions and not mention_all:
        counters_count_messages(
            [
                (uid, [(conversation_id, seq, (seq,))])
                for uid in dict.fromkeys(mentions)
                if uid != sender_id
            ]
        )


def counters_channel_raise(*, conversation_id: int, top: int, recalled: Sequence[int] = ()) -> int:
    """Make sure a channel's top is at least ``top`` (PostgreSQL's ``last_seq``: a conversion,
    a repair) and its record of recalls holds ``recalled``; returns the top."""
    if recalled:
        channel_scripts().client.zadd(
            keys.channel_recalled(conversation_id), {str(s): s for s in recalled}
        )
    return int(channel_scripts().channel(conversation_id, 0, known_top=top))


def counters_message_recalled(
    *, conversation_id: int, seq: int, user_ids: Sequence[int], channel: bool
) -> list[int]:
    """A committed recall of message ``seq``: the conversation's record of recalls (one call,
    whatever the group's size; in ``channel`` form every reader's unread counts against it)
    and one call per user in ``user_ids`` (members whose counters are in aggregate form, and
    the users a channel-form message mentioned). Idempotent and seq-keyed: a second call, or
    one for a message already read, changes nothing. Returns each user's badge change."""
    channel_scripts().recall_channel(conversation_id, seq, channel=channel)
    return get_strategy().recall_many(list(user_ids), conversation_id, seq) if user_ids else []


def counters_channel_repair(*, conversation_ids: Sequence[int]) -> dict[int, int]:
    """Set the top of channels whose key Redis lost from PostgreSQL, and their record of
    recalls; returns the tops."""
    last = dict(
        Conversation.objects.filter(pk__in=list(conversation_ids)).values_list("pk", "last_seq")
    )
    recalled: dict[int, list[int]] = {}
    for cid, seq in Message.objects.filter(
        conversation_id__in=list(conversation_ids), deleted=True
    ).values_list("conversation_id", "seq"):
        recalled.setdefault(cid, []).append(seq)
    scripts = channel_scripts()
    pipe = scripts.client.pipeline(transaction=False)
    for cid, seqs in recalled.items():
        pipe.zadd(keys.channel_recalled(cid), {str(s): s for s in seqs})
    for cid in conversation_ids:
        scripts.channel(cid, 0, known_top=last.get(cid, 0), pipe=pipe)
    tops = execute(pipe)[len(recalled) :]
    return {cid: int(top) for cid, top in zip(conversation_ids, tops, strict=True)}


def counters_channel_mentions_all(*, conversation_id: int) -> list[int]:
    """Every mention_all seq the channel recorded (a conversion to the aggregate form folds
    them into each member's own mentions)."""
    client = channel_scripts().client
    return [int(s) for s in client.zrange(keys.channel_mentions_all(conversation_id), 0, -1)]


@cache
def _channel_scripts(url: str) -> CounterScripts:
    return CounterScripts(get_redis())


def channel_scripts() -> CounterScripts:
    """The channel script runs the same under every strategy: one conversation's keys, one
    call."""
    return _channel_scripts(store_id())


def counters_rebuild(*, user_id: int, rows: list[MembershipRow] | None = None) -> CounterDiff:
    """Recompute one user's counters from PostgreSQL and report what Redis held that
    differed."""
    strategy = get_strategy()
    before = strategy.fetch(user_id)
    if rows is None:
        rows = counters_truth_rows(user_ids=[user_id])[user_id]
    strategy.load(user_id, rows)
    return _diff(user_id, before, counters_truth_from_rows(rows))


def counters_reconcile(*, user_ids: Iterable[int] | None = None) -> ReconcileReport:
    """Rebuild the given users (all users when None) and report the differences."""
    if user_ids is None:
        user_ids = (
            get_user_model()
            .objects.order_by("pk")
            .values_list("pk", flat=True)
            .iterator(chunk_size=RECONCILE_CHUNK)
        )
    report = ReconcileReport()
    chunk: list[int] = []
    for user_id in user_ids:
        chunk.append(user_id)
        if len(chunk) >= RECONCILE_CHUNK:
            _reconcile_chunk(chunk, report)
            chunk = []
    if chunk:
        _reconcile_chunk(chunk, report)
    logger.info("reconcile: %s", report.summary())
    return report


def _reconcile_chunk(user_ids: list[int], report: ReconcileReport) -> None:
    truth_rows = counters_truth_rows(user_ids=user_ids)
    for user_id in user_ids:
        diff = counters_rebuild(user_id=user_id, rows=truth_rows.get(user_id, []))
        report.users_checked += 1
        report.users_not_loaded += not diff.was_loaded
        if diff.differed:
            report.diffs.append(diff)


def _diff(user_id: int, before_fields: dict[str, str], truth: UnreadCounts) -> CounterDiff:
    diff = CounterDiff(user_id=user_id, was_loaded=keys.READY in before_fields)
    if not diff.was_loaded:
        return diff
    before = counts_with_channels(before_fields)
    if before.badge != truth.badge:
        diff.badge = (before.badge, truth.badge)
    for cid in sorted(set(before.conversations) | set(truth.conversations)):
        was, should = before.conversations.get(cid), truth.conversations.get(cid)
        if was != should:
            diff.conversations[cid] = (was, should)
    for cid in sorted(set(before.mentions) | set(truth.mentions)):
        was, should = before.mentions.get(cid, 0), truth.mentions.get(cid, 0)
        if was != should:
            diff.mentions[cid] = (was, should)
    return diff
