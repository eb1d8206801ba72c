"""Reads of the counters app: the truth from PostgreSQL and the counts from Redis."""

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import connection

from imcore.models import Conversation, Membership, Message

from . import keys
from .strategies import get_strategy
from .transitions import MembershipRow, mention_seqs


@dataclass(frozen=True)
class UnreadCounts:
    badge: int
    conversations: dict[int, int] = field(default_factory=dict)
    # unread mentions per conversation, only those with at least one (not in the badge)
    mentions: dict[int, int] = field(default_factory=dict)


def counters_truth_rows(*, user_ids: Iterable[int]) -> dict[int, list[MembershipRow]]:
    """Every membership row (active or left) of the given users, as PostgreSQL has it now."""
    user_ids = list(user_ids)
    rows: dict[int, list[MembershipRow]] = defaultdict(list)
    memberships = Membership.objects.filter(user_id__in=user_ids).values_list(
        "user_id",
        "conversation_id",
        "rev",
        "left_at",
        "muted",
        "last_read_seq",
        "conversation__last_seq",
        "conversation__mode",
        "conversation__mode_gen",
    )
    # The mentions are read after the rows: every mention up to a row's top is then in them,
    # so the load can drop a seq Redis holds below that top that the truth does not have.
    memberships = list(memberships)
    mentions = counters_truth_mentions(user_ids=user_ids)
    recalled = counters_truth_recalled(user_ids=user_ids)
    for user_id, cid, rev, left_at, muted, read_seq, top, mode, gen in memberships:
        rows[user_id].append(
            MembershipRow(
                conversation_id=cid,
                rev=rev,
                active=left_at is None,
                muted=muted,
                read_seq=read_seq,
                top=top,
                mentions=tuple(mentions.get((user_id, cid), ())),
                gen=gen,
                channel=mode in Conversation.CHANNEL_FORM_MODES,
                recalled=tuple(recalled.get((user_id, cid), ())),
            )
        )
    return rows


def counters_truth_mentions(*, user_ids: list[int]) -> dict[tuple[int, int], list[int]]:
    """The unread mention seqs of the given users, by ``(user id, conversation id)``: messages
    above the user's read pointer in an active membership, sent by someone else, that mention
    the user or everyone. One query: the GIN index on ``mentions`` finds the personal ones,
    the partial index on ``mention_all`` the others (mentions are rare, so neither scans the
    unread messages themselves)."""
    sql = """
        SELECT mb.user_id, msg.conversation_id, msg.seq
          FROM {message} msg
          JOIN {membership} mb
            ON mb.conversation_id = msg.conversation_id AND mb.user_id = ANY(msg.mentions)
         WHERE msg.mentions && %(users)s::bigint[] AND mb.user_id = ANY(%(users)s::bigint[])
           AND mb.left_at IS NULL AND msg.seq > mb.last_read_seq AND msg.sender_id <> mb.user_id
           AND NOT msg.deleted
        UNION
        SELECT mb.user_id, msg.conversation_id, msg.seq
          FROM {membership} mb
          JOIN {message} msg
            ON msg.conversation_id = mb.conversation_id AND msg.mention_all
           AND msg.seq > mb.last_read_seq
         WHERE mb.user_id = ANY(%(users)s::bigint[]) AND mb.left_at IS NULL
           AND msg.sender_id <> mb.user_id AND NOT msg.deleted
         ORDER BY 1, 2, 3
    """
    return _seqs_by_membership(sql, user_ids)


def counters_truth_recalled(*, user_ids: list[int]) -> dict[tuple[int, int], list[int]]:
    """The recalled seqs above each active membership's read pointer of the given users, by
    ``(user id, conversation id)`` (recalls are rare: the partial index finds them)."""
    sql = """
        SELECT mb.user_id, msg.conversation_id, msg.seq
          FROM {membership} mb
          JOIN {message} msg
            ON msg.conversation_id = mb.conversation_id AND msg.deleted
           AND msg.seq > mb.last_read_seq
         WHERE mb.user_id = ANY(%(users)s::bigint[]) AND mb.left_at IS NULL
         ORDER BY 1, 2, 3
    """
    return _seqs_by_membership(sql, user_ids)


def _seqs_by_membership(sql: str, user_ids: list[int]) -> dict[tuple[int, int], list[int]]:
    """Rows ``(user id, conversation id, seq)`` of ``sql`` (its ``{message}`` and
    ``{membership}`` the tables, run with ``%(users)s``), the seqs grouped by ``(user id,
    conversation id)``."""
    if not user_ids:
        return {}
    tables = {"message": Message._meta.db_table, "membership": Membership._meta.db_table}
    sql = sql.format(**tables)
    found: dict[tuple[int, int], list[int]] = defaultdict(list)
    with connection.cursor() as cursor:
        cursor.execute(sql, {"users": list(user_ids)})
        for user_id, cid, seq in cursor.fetchall():
            found[user_id, cid].append(seq)
    return found


def counters_truth_from_rows(rows: Iterable[MembershipRow]) -> UnreadCounts:
    """unread = last_seq - last_read_seq - recalled seqs above it, per active membership;
    badge = sum over unmuted."""
    conversations = {
        r.conversation_id: max(r.top - r.read_seq - len(r.recalled), 0) for r in rows if r.active
    }
    muted = {r.conversation_id for r in rows if r.active and r.muted}
    badge = sum(n for cid, n in conversations.items() if cid not in muted)
    mentions = {r.conversation_id: len(r.mentions) for r in rows if r.active and r.mentions}
    return UnreadCounts(badge=badge, conversations=conversations, mentions=mentions)


def counters_truth(*, user_id: int) -> UnreadCounts:
    return counters_truth_from_rows(counters_truth_rows(user_ids=[user_id])[user_id])


@dataclass(frozen=True)
class ChannelState:
    """What the counters of a channel-form conversation need from its channel keys."""

    top: int
    changed_ms: int
    mentions_all: tuple[int, ...]  # its mention_all seqs above the reader's pointer
    recalled: tuple[int, ...] = ()  # its recalled seqs above the reader's pointer


def channel_conversations(fields: dict[str, str]) -> list[int]:
    """The conversations a counter hash holds in channel form."""
    return [int(f[2:]) for f in fields if f.startswith("c:")]


def counters_channel_states(reads: dict[int, int]) -> dict[int, ChannelState]:
    """The channel keys of ``{conversation id: read pointer}``, in one pipeline (one round trip
    per node). A top Redis lost (a wipe) is set again from PostgreSQL's ``last_seq``."""
    if not reads:
        return {}
    client = get_strategy().client
    pipe = client.pipeline(transaction=False)
    for cid, r in reads.items():
        pipe.hmget(keys.channel(cid), keys.CHANNEL_TOP, keys.CHANNEL_MS)
        pipe.zrangebyscore(keys.channel_mentions_all(cid), f"({r}", "+inf")
        pipe.zrangebyscore(keys.channel_recalled(cid), f"({r}", "+inf")
    replies = pipe.execute()
    states = {}
    missing = []
    for i, cid in enumerate(reads):
        (top, ms), alls, recalled = replies[3 * i : 3 * i + 3]
        if top is None:
            missing.append(cid)
        states[cid] = ChannelState(
            top=int(top or 0),
            changed_ms=int(ms or 0),
            mentions_all=tuple(int(s) for s in alls),
            recalled=tuple(int(s) for s in recalled),
        )
    if missing:
        from .services import counters_channel_repair

        repaired = counters_channel_repair(conversation_ids=missing)
        again = client.pipeline(transaction=False)
        for cid in repaired:
            again.zrangebyscore(keys.channel_recalled(cid), f"({reads[cid]}", "+inf")
        for (cid, top), recalled in zip(repaired.items(), again.execute(), strict=True):
            states[cid] = ChannelState(
                top,
                states[cid].changed_ms,
                states[cid].mentions_all,
                tuple(int(s) for s in recalled),
            )
    return states


def counts_from_fields(
    fields: dict[str, str], channels: dict[int, ChannelState] | None = None
) -> UnreadCounts:
    """The counts a counter hash holds; the conversations in channel form count against their
    ``channels`` state: ``max(top, t) - r - (its recalled seqs above r)``, and the mentions
    are the user's own (``n:``) and the channel's mention_all seqs above the pointer, once
    each, none of them recalled."""
    conversations = {int(f[2:]): int(v) for f, v in fields.items() if f.startswith("u:")}
    mentions = {cid: len(seqs) for cid in conversations if (seqs := mention_seqs(fields, cid))}
    badge = int(fields.get(keys.BADGE) or 0)
    for cid, state in (channels or {}).items():
        r = int(fields.get(keys.read_field(cid)) or 0)
        t = int(fields.get(keys.top_field(cid)) or 0)
        n = max(max(state.top, t) - r - len(state.recalled), 0)
        conversations[cid] = n
        if fields.get(keys.muted_field(cid)) != "1":
            badge += n
        seqs = set(mention_seqs(fields, cid)) | {s for s in state.mentions_all if s > r}
        if seqs := seqs - set(state.recalled):
            mentions[cid] = len(seqs)
    return UnreadCounts(badge=badge, conversations=conversations, mentions=mentions)


def counts_with_channels(fields: dict[str, str]) -> UnreadCounts:
    """:func:`counts_from_fields` with the channel states read: one more round trip, only when
    the user has channel-form conversations."""
    reads = {
        cid: int(fields.get(keys.read_field(cid)) or 0) for cid in channel_conversations(fields)
    }
    return counts_from_fields(fields, counters_channel_states(reads))


def counters_get(*, user_id: int) -> UnreadCounts:
    """The user's badge and unread counts from Redis: the user's hash (one round trip) and, for
    the conversations in channel form, their channel keys (one more). When the user's hash is
    missing (Redis restarted empty, or evicted) it is rebuilt from PostgreSQL first, so a read
    never returns a wrong zero."""
    strategy = get_strategy()
    fields = strategy.fetch(user_id)
    if keys.READY not in fields:
        from .services import counters_rebuild

        counters_rebuild(user_id=user_id)
        fields = strategy.fetch(user_id)
    return counts_with_channels(fields)


def counters_peek(*, user_id: int) -> UnreadCounts | None:
    """What Redis holds now, without rebuilding (None if the hash is not loaded). For the
    admin and for tests that compare Redis with the truth."""
    fields = get_strategy().fetch(user_id)
    return counts_with_channels(fields) if keys.READY in fields else None
