"""Writes of the counters app, a sink of :mod:`delivery`: its callers (delivery, tasks, admin,
commands) use only these functions; the strategy and the key layout stay behind them. It never
imports delivery/."""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from django.contrib.auth import get_user_model

from imcore.models import Membership

from . import keys
from .selectors import (
    UnreadCounts,
    counters_truth_from_rows,
    counters_truth_rows,
    counts_from_fields,
)
from .strategies import get_strategy
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
    *, user_id: int, conversation_id: int, read_seq: int, last_seq: int
) -> tuple[int, int]:
    """Apply a committed mark-read at once; returns ``(unread, badge)``. Rebuilds the user's
    counters first when Redis does not hold them."""
    strategy = get_strategy()
    try:
        return strategy.read(user_id, conversation_id, read_seq, last_seq)
    except (CountersNotLoaded, CountersNotMember):
        counters_rebuild(user_id=user_id)
    try:
        return strategy.read(user_id, conversation_id, read_seq, last_seq)
    except CountersNotMember:
        # The user left between the read's commit and now: nothing of it is unread any more.
        return 0, counts_from_fields(strategy.fetch(user_id)).badge


def counters_membership_changed(*, membership: Membership, last_seq: int) -> None:
    """Apply a committed join, leave, mute or unmute (carries the membership's ``rev``)."""
    counters_memberships_changed(memberships=[membership], last_seq=last_seq)


def counters_memberships_changed(*, memberships: list[Membership], last_seq: int) -> None:
    """The same for many memberships of one conversation, pipelined (a 5,000-member group is
    created in a few round trips, not 5,000)."""
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
                ),
            )
            for m in memberships
        ]
    )


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
    before = counts_from_fields(before_fields)
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
