"""Reads of the counters app: the truth from PostgreSQL and the counts from Redis."""

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from imcore.models import Membership

from . import keys
from .strategies import get_strategy
from .transitions import MembershipRow


@dataclass(frozen=True)
class UnreadCounts:
    badge: int
    conversations: dict[int, int] = field(default_factory=dict)


def counters_truth_rows(*, user_ids: Iterable[int]) -> dict[int, list[MembershipRow]]:
    """Every membership row (active or left) of the given users, as PostgreSQL has it now."""
    rows: dict[int, list[MembershipRow]] = defaultdict(list)
    memberships = Membership.objects.filter(user_id__in=list(user_ids)).values_list(
        "user_id",
        "conversation_id",
        "rev",
        "left_at",
        "muted",
        "last_read_seq",
        "conversation__last_seq",
    )
    for user_id, cid, rev, left_at, muted, read_seq, top in memberships:
        rows[user_id].append(
            MembershipRow(
                conversation_id=cid,
                rev=rev,
                active=left_at is None,
                muted=muted,
                read_seq=read_seq,
                top=top,
            )
        )
    return rows


def counters_truth_from_rows(rows: Iterable[MembershipRow]) -> UnreadCounts:
    """unread = last_seq - last_read_seq per active membership; badge = sum over unmuted."""
    conversations = {r.conversation_id: max(r.top - r.read_seq, 0) for r in rows if r.active}
    muted = {r.conversation_id for r in rows if r.active and r.muted}
    badge = sum(n for cid, n in conversations.items() if cid not in muted)
    return UnreadCounts(badge=badge, conversations=conversations)


def counters_truth(*, user_id: int) -> UnreadCounts:
    return counters_truth_from_rows(counters_truth_rows(user_ids=[user_id])[user_id])


def counts_from_fields(fields: dict[str, str]) -> UnreadCounts:
    return UnreadCounts(
        badge=int(fields.get(keys.BADGE) or 0),
        conversations={int(f[2:]): int(v) for f, v in fields.items() if f.startswith("u:")},
    )


def counters_get(*, user_id: int) -> UnreadCounts:
    """The user's badge and unread counts from Redis. When the user's hash is missing (Redis
    restarted empty, or evicted) it is rebuilt from PostgreSQL first, so a read never returns
    a wrong zero."""
    strategy = get_strategy()
    fields = strategy.fetch(user_id)
    if keys.READY not in fields:
        from .services import counters_rebuild

        counters_rebuild(user_id=user_id)
        fields = strategy.fetch(user_id)
    return counts_from_fields(fields)


def counters_peek(*, user_id: int) -> UnreadCounts | None:
    """What Redis holds now, without rebuilding (None if the hash is not loaded). For the
    admin and for tests that compare Redis with the truth."""
    fields = get_strategy().fetch(user_id)
    return counts_from_fields(fields) if keys.READY in fields else None
