"""Mentions on their way through the write paths. A plain message's event stays
``(conversation id, seq)``; one that mentions someone carries more:
``(conversation id, seq, sender id, mentioned user ids, mention_all)``. In a stream entry
these are the fields ``u=<sender id>``, ``m=<mentioned ids, comma separated>`` and ``a=1``
beside ``c`` and ``s``.

A batch's mention events become, per user, the seqs that mention that user (every member
but the sender for ``mention_all``); those ride in the user's one counter call
(:func:`counters.services.counters_count_messages`), where a seq is held once however often
it comes (exactly-once effect from the seq, as for the tops).
"""

from collections import defaultdict
from collections.abc import Iterable, Sequence

Event = tuple  # (cid, seq) or (cid, seq, sender_id, mentioned ids, mention_all)


def mention_event(
    conversation_id: int,
    seq: int,
    *,
    sender_id: int | None,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
) -> Event:
    """The event of a committed message: plain unless it mentions someone."""
    if not mentions and not mention_all:
        return (conversation_id, seq)
    return (conversation_id, seq, sender_id, tuple(mentions), bool(mention_all))


def stream_fields(event: Event) -> list:
    """The extra stream fields of an event (none for a plain one)."""
    if len(event) <= 2:
        return []
    _, _, sender_id, mentions, mention_all = event
    fields = ["u", sender_id or 0, "m", ",".join(map(str, mentions))]
    return [*fields, "a", 1] if mention_all else fields


def event_from_fields(fields: dict[str, str]) -> Event:
    """The event of a stream entry (entries written before mentions have no ``u``)."""
    cid, seq = int(fields["c"]), int(fields["s"])
    if "u" not in fields:
        return (cid, seq)
    mentioned = tuple(int(u) for u in fields.get("m", "").split(",") if u)
    return (cid, seq, int(fields["u"]) or None, mentioned, fields.get("a") == "1")


class MentionIndex:
    """The mention seqs of a batch of events, looked up per (user, conversation)."""

    def __init__(self, events: Iterable[Event]):
        self.personal: dict[tuple[int, int], set[int]] = defaultdict(set)
        self.everyone: dict[int, set[tuple[int, int | None]]] = defaultdict(set)
        for event in events:
            if len(event) <= 2:
                continue
            cid, seq, sender_id, mentioned, mention_all = event
            if mention_all:
                self.everyone[cid].add((seq, sender_id))
            for uid in mentioned:
                if uid != sender_id:
                    self.personal[uid, cid].add(seq)

    def __bool__(self) -> bool:
        return bool(self.personal or self.everyone)

    def seqs(self, user_id: int, conversation_id: int) -> tuple[int, ...]:
        """The seqs that mention the user in the conversation, ascending."""
        found = self.personal.get((user_id, conversation_id), set())
        if everyone := self.everyone.get(conversation_id):
            found = found | {seq for seq, sender in everyone if sender != user_id}
        return tuple(sorted(found))

    def counter_pairs(self, user_id: int, pairs: Sequence[tuple[int, int]]) -> list[tuple]:
        """The user's ``(cid, top)`` pairs for the counter call, with the mention seqs added
        where there are some."""
        out = []
        for cid, top in pairs:
            seqs = self.seqs(user_id, cid)
            out.append((cid, top, seqs) if seqs else (cid, top))
        return out
