"""The counter state transitions in plain Python, for the ``watch``, ``lock`` and ``naive``
strategies. Each function mirrors the Lua script of the same name in ``counters/lua/`` and
works on a :class:`Working` copy of one user's hash; the strategy decides how the copy is read
and written back (atomically or not). The Hypothesis test runs every strategy against one model,
which keeps the two implementations in step.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import keys


class CountersNotLoaded(Exception):
    """The user's hash is not loaded from PostgreSQL; rebuild it, then retry."""


class CountersNotMember(Exception):
    """Redis does not know the user as a member of the conversation; rebuild, then retry."""


@dataclass(frozen=True)
class MembershipRow:
    """One membership as PostgreSQL has it, the input of ``member`` and ``load``."""

    conversation_id: int
    rev: int
    active: bool
    muted: bool
    read_seq: int
    top: int
    # seqs above read_seq of the messages that mention the user (``load``: read after the
    # row, so it holds every one up to ``top``; ``member``: the channel's mention_all seqs,
    # folded in when the form turns aggregate)
    mentions: tuple[int, ...] = ()
    # the conversation's mode generation and whether its form is channel (see keys.py)
    gen: int = 0
    channel: bool = False
    # recalled seqs above read_seq (``load``: the truth's; ``member``: the channel's record,
    # folded in when the form turns aggregate); they join ``x:<cid>``
    recalled: tuple[int, ...] = ()


class Working:
    """A copy of one user's hash that records what changed."""

    def __init__(self, fields: dict[str, str]):
        self.fields = dict(fields)
        self.changed: dict[str, str] = {}
        self.deleted: set[str] = set()
        self.badge_delta = 0

    def get(self, field: str) -> str | None:
        return self.fields.get(field)

    def num(self, field: str) -> int:
        return int(self.fields.get(field) or 0)

    def set(self, field: str, value: int | str) -> None:
        self.fields[field] = str(value)
        self.changed[field] = str(value)
        self.deleted.discard(field)

    def delete(self, *fields: str) -> None:
        for field in fields:
            if field in self.fields:
                del self.fields[field]
                self.changed.pop(field, None)
                self.deleted.add(field)

    def add_badge(self, delta: int) -> None:
        if delta:
            self.badge_delta += delta
            self.fields[keys.BADGE] = str(self.num(keys.BADGE) + delta)

    @property
    def ready(self) -> bool:
        return keys.READY in self.fields

    def muted(self, cid: int | str) -> bool:
        return self.get(keys.muted_field(cid)) == "1"


def inc(w: Working, pairs: Iterable[Sequence]) -> int:
    """Count messages up to ``seq`` in each conversation (items ``(cid, seq)`` or ``(cid,
    seq, mention seqs)``); returns the badge change."""
    delta = 0
    for pair in pairs:
        cid, seq = pair[0], pair[1]
        if len(pair) > 2 and pair[2]:
            _store_mentions(w, cid, pair[2], w.num(keys.read_field(cid)))
        if w.ready and w.get(keys.rev_field(cid)) is None:
            w.delete(keys.READY)  # a join Redis never heard of: rebuild on the next read
        if seq <= w.num(keys.top_field(cid)):
            continue
        w.set(keys.top_field(cid), seq)
        unread = w.get(keys.unread_field(cid))
        if unread is None:
            continue
        n = max(seq - w.num(keys.read_field(cid)) - len(recalled_seqs(w.fields, cid)), 0)
        d = n - int(unread)
        if d:
            w.set(keys.unread_field(cid), n)
            if not w.muted(cid):
                delta += d
    w.add_badge(delta)
    return delta


def read(w: Working, cid: int, read_seq: int, top: int) -> tuple[int, int]:
    """Move the read pointer up; returns ``(unread, badge)``."""
    if not w.ready:
        raise CountersNotLoaded
    unread = w.get(keys.unread_field(cid))
    channel = w.get(keys.channel_field(cid)) is not None
    if unread is None and not channel:
        raise CountersNotMember
    r = max(w.num(keys.read_field(cid)), read_seq)
    t = max(w.num(keys.top_field(cid)), top, r)
    w.set(keys.read_field(cid), r)
    w.set(keys.top_field(cid), t)
    n = max(t - r - _store_recalled(w, cid, (), r), 0)
    _store_mentions(w, cid, (), r)
    if channel:
        return n, w.num(keys.BADGE)
    w.set(keys.unread_field(cid), n)
    if not w.muted(cid):
        w.add_badge(n - int(unread))
    return n, w.num(keys.BADGE)


def member(w: Working, row: MembershipRow) -> int:
    """Apply a join, leave or mute change unless a newer one was applied, and the row's form
    unless a newer generation was applied; returns the stored badge's change."""
    cid = row.conversation_id
    rev_new = row.rev > w.num(keys.rev_field(cid))
    stored_gen = w.num(keys.gen_field(cid))
    gen_new = row.gen > stored_gen
    if not rev_new and not gen_new:
        return 0
    unread = w.get(keys.unread_field(cid))
    old = int(unread) if unread is not None and not w.muted(cid) else 0
    channel = w.get(keys.channel_field(cid)) is not None
    active = unread is not None or channel
    if gen_new:
        w.set(keys.gen_field(cid), row.gen)
        channel = row.channel
    elif rev_new and row.gen == stored_gen:
        channel = row.channel  # a rejoin after a leave (which dropped c:) of this generation
    if rev_new:
        w.set(keys.rev_field(cid), row.rev)
        active = row.active
        if active:
            w.set(keys.muted_field(cid), "1" if row.muted else "0")
    new = 0
    if active:
        n, r = _set_active(w, row, channel)
        _store_mentions(w, cid, row.mentions, r)
        if not channel and not w.muted(cid):
            new = n
    else:
        w.delete(*_membership_fields(cid))
    w.add_badge(new - old)
    return new - old


def load(w: Working, rows: Sequence[MembershipRow]) -> int:
    """Merge PostgreSQL's rows into the hash, recompute every unread and the stored badge, mark
    the hash ready; returns the stored badge."""
    for row in rows:
        cid = row.conversation_id
        rev_ok = row.rev >= w.num(keys.rev_field(cid))
        channel = w.get(keys.channel_field(cid)) is not None
        if row.gen >= w.num(keys.gen_field(cid)):
            w.set(keys.gen_field(cid), row.gen)
            channel = row.channel
        active = w.get(keys.read_field(cid)) is not None
        if rev_ok:
            w.set(keys.rev_field(cid), row.rev)
            active = row.active
            if active:
                w.set(keys.muted_field(cid), "1" if row.muted else "0")
        if active:
            r = _set_active(w, row, channel)[1]
            if rev_ok:
                _store_mentions(w, cid, row.mentions, r, held_above=row.top)
        else:
            w.delete(*_membership_fields(cid))
    badge = 0
    for field in [f for f in w.fields if f.startswith("u:")]:
        cid = field[2:]
        n = max(
            w.num(keys.top_field(cid))
            - w.num(keys.read_field(cid))
            - len(recalled_seqs(w.fields, cid)),
            0,
        )
        if n != w.num(field):
            w.set(field, n)
        if not w.muted(cid):
            badge += n
    w.set(keys.BADGE, badge)
    w.set(keys.READY, 1)
    return badge


def _set_active(w: Working, row: MembershipRow, channel: bool) -> tuple[int, int]:
    """Set an active membership's pointers and form (mute is set by the caller); returns
    ``(unread as of the row, read pointer)``. Mentions and recalled seqs at or below the read
    pointer go."""
    cid = row.conversation_id
    r = max(w.num(keys.read_field(cid)), row.read_seq)
    t = max(w.num(keys.top_field(cid)), row.top, r)
    w.set(keys.read_field(cid), r)
    w.set(keys.top_field(cid), t)
    n = max(t - r - _store_recalled(w, cid, row.recalled, r), 0)
    if channel:
        w.set(keys.channel_field(cid), 1)
        w.delete(keys.unread_field(cid))
    else:
        w.set(keys.unread_field(cid), n)
        w.delete(keys.channel_field(cid))
    _store_mentions(w, cid, (), r)
    return n, r


def _store_mentions(
    w: Working, cid: int | str, new: Iterable[int | str], r: int, held_above: int = 0
) -> None:
    """Keep in ``n:<cid>`` the seqs it holds and ``new`` above ``r``, ascending, once each
    (delete the field when none is left), none of them recalled; a seq it holds stays only if
    above ``held_above`` too (``load``: the truth's rows cover every seq up to their top)."""
    field = keys.mentions_field(cid)
    current = w.get(field)
    held = [int(s) for s in current.split(",")] if current else []
    held = [s for s in held if s > held_above]
    gone = set(recalled_seqs(w.fields, cid))
    kept = sorted({int(s) for s in (*held, *new) if int(s) > r} - gone)
    if not kept:
        w.delete(field)
    elif (value := ",".join(map(str, kept))) != current:
        w.set(field, value)


def recall(w: Working, cid: int, seq: int) -> int:
    """A message was recalled: above the read pointer its seq joins ``x:<cid>`` (once), the top
    rises to it, the unread drops and its mention goes; returns the badge change."""
    if w.ready and w.get(keys.rev_field(cid)) is None:
        w.delete(keys.READY)
    r = w.num(keys.read_field(cid))
    if seq <= r or seq in recalled_seqs(w.fields, cid):
        return 0
    x = _store_recalled(w, cid, (seq,), r)
    t = w.num(keys.top_field(cid))
    if seq > t:
        t = seq
        w.set(keys.top_field(cid), t)
    _store_mentions(w, cid, (), r)
    unread = w.get(keys.unread_field(cid))
    if unread is None:
        return 0
    n = max(t - r - x, 0)
    d = n - int(unread)
    if not d:
        return 0
    w.set(keys.unread_field(cid), n)
    if w.muted(cid):
        return 0
    w.add_badge(d)
    return d


def _store_recalled(w: Working, cid: int | str, new: Iterable[int | str], r: int) -> int:
    """Keep in ``x:<cid>`` the recalled seqs it holds and ``new`` above ``r``; returns how
    many."""
    field = keys.recalled_field(cid)
    current = w.get(field)
    kept = sorted({int(s) for s in (*recalled_seqs(w.fields, cid), *new) if int(s) > r})
    if not kept:
        w.delete(field)
    elif (value := ",".join(map(str, kept))) != current:
        w.set(field, value)
    return len(kept)


def recalled_seqs(fields: dict[str, str], cid: int | str) -> list[int]:
    """The recalled seqs above the read pointer a counter hash holds for one conversation."""
    value = fields.get(keys.recalled_field(cid))
    return [int(s) for s in value.split(",")] if value else []


def mention_seqs(fields: dict[str, str], cid: int | str) -> list[int]:
    """The unread mention seqs a counter hash holds for one conversation."""
    value = fields.get(keys.mentions_field(cid))
    return [int(s) for s in value.split(",")] if value else []


def _membership_fields(cid: int | str) -> tuple[str, ...]:
    return (
        keys.unread_field(cid),
        keys.read_field(cid),
        keys.top_field(cid),
        keys.muted_field(cid),
        keys.mentions_field(cid),
        keys.channel_field(cid),
        keys.recalled_field(cid),
    )
