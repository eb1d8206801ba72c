"""The counter operations, run through every strategy, and the Lua scripts held to their
Python mirrors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from counters import keys
from counters.strategies import STRATEGIES, get_strategy
from counters.transitions import CountersNotLoaded, CountersNotMember, MembershipRow

ALL = sorted(STRATEGIES)
U = 7  # a user id; these tests need no database rows


def row(
    cid,
    rev=1,
    active=True,
    muted=False,
    read=0,
    top=0,
    mentions=(),
    gen=0,
    channel=False,
    recalled=(),
):
    return MembershipRow(
        conversation_id=cid,
        rev=rev,
        active=active,
        muted=muted,
        read_seq=read,
        top=top,
        mentions=tuple(mentions),
        gen=gen,
        channel=channel,
        recalled=tuple(recalled),
    )


def counts(strategy, user_id=U):
    fields = strategy.fetch(user_id)
    unread = {int(f[2:]): int(v) for f, v in fields.items() if f.startswith("u:")}
    return int(fields.get("badge", 0)), unread


def mentions(strategy, user_id=U):
    """The unread mention seqs the hash holds, by conversation."""
    fields = strategy.fetch(user_id)
    return {int(f[2:]): v for f, v in fields.items() if f.startswith("n:")}


@pytest.fixture(params=ALL)
def strategy(request):
    return get_strategy(request.param)


def test_increment_is_idempotent_and_order_free(strategy):
    """An event applied twice or after a newer one changes nothing."""
    strategy.load(U, [row(1)])
    strategy.inc_many([(U, [(1, 2)]), (U, [(1, 1)]), (U, [(1, 2)])])
    assert counts(strategy) == (2, {1: 2})
    strategy.inc_many([(U, [(1, 3)])])
    assert counts(strategy) == (3, {1: 3})


def test_read_never_moves_back_and_beats_queued_increments(strategy):
    """A read past queued increments is not undone when they arrive."""
    strategy.load(U, [row(1), row(2)])
    strategy.inc_many([(U, [(1, 5), (2, 1)])])
    assert strategy.read(U, 1, 4, 5) == (1, 2)
    assert strategy.read(U, 1, 2, 5) == (1, 2)  # an older read changes nothing
    assert strategy.read(U, 1, 7, 7) == (0, 1)  # read beyond what Redis has counted
    strategy.inc_many([(U, [(1, 6)]), (U, [(1, 7)])])  # the late increments
    assert counts(strategy) == (1, {1: 0, 2: 1})


def test_mute_moves_count_out_of_badge_and_back(strategy):
    """Muting takes the conversation's unread out of the badge; unmuting puts it back."""
    strategy.load(U, [row(1), row(2)])
    strategy.inc_many([(U, [(1, 3), (2, 2)])])
    strategy.member(U, row(1, rev=2, muted=True, top=3))
    assert counts(strategy) == (2, {1: 3, 2: 2})
    strategy.inc_many([(U, [(1, 4)])])
    assert counts(strategy) == (2, {1: 4, 2: 2})
    strategy.member(U, row(1, rev=3, muted=False, top=4))
    assert counts(strategy) == (6, {1: 4, 2: 2})


def test_membership_changes_apply_in_rev_order(strategy):
    """A leave that reaches Redis after a newer rejoin is ignored."""
    strategy.load(U, [row(1)])
    strategy.inc_many([(U, [(1, 3)])])
    strategy.member(U, row(1, rev=3, read=3, top=3))  # rejoin (rev 3) arrives first
    strategy.member(U, row(1, rev=2, active=False))  # the older leave arrives late
    assert counts(strategy) == (0, {1: 0})
    strategy.inc_many([(U, [(1, 4)])])
    assert counts(strategy) == (1, {1: 1})


def test_leave_removes_count_and_join_starts_at_zero(strategy):
    """Leaving drops the conversation from the badge; increments after leaving are ignored;
    joining later starts at zero."""
    strategy.load(U, [row(1), row(2)])
    strategy.inc_many([(U, [(1, 3), (2, 1)])])
    strategy.member(U, row(1, rev=2, active=False))
    strategy.inc_many([(U, [(1, 4)])])
    assert counts(strategy) == (1, {2: 1})
    strategy.member(U, row(1, rev=3, read=4, top=4))
    assert counts(strategy) == (1, {1: 0, 2: 1})


def test_message_counted_before_its_join_reaches_redis_is_kept(strategy):
    """A message counted while the member's join is still on its way to Redis (PostgreSQL
    already lists the member) is kept by the join, and the user is marked for a rebuild."""
    strategy.load(U, [row(2)])
    strategy.inc_many([(U, [(1, 1)])])
    assert "ready" not in strategy.fetch(U)  # Redis did not know the membership: rebuild
    strategy.member(U, row(1, rev=1, read=0, top=0))  # the join arrives late
    assert counts(strategy) == (1, {1: 1, 2: 0})


def test_reads_need_a_loaded_hash(strategy):
    """Before a load a read refuses (the caller rebuilds); a non-member read refuses too."""
    with pytest.raises(CountersNotLoaded):
        strategy.read(U, 1, 1, 1)
    strategy.load(U, [row(1)])
    with pytest.raises(CountersNotMember):
        strategy.read(U, 2, 1, 1)


def test_increments_before_a_load_are_kept_by_it(strategy):
    """An event applied while the hash is not loaded (after a wipe) survives a load built
    from an older snapshot."""
    strategy.inc_many([(U, [(1, 5)])])
    strategy.load(U, [row(1, read=1, top=4)])  # the snapshot was read before seq 5
    assert counts(strategy) == (4, {1: 4})


def test_mentions_count_once_and_go_with_a_read(strategy):
    """A mention seq is held once however often it arrives, stays out of the badge, and a
    read past it drops it while one before it keeps it."""
    strategy.load(U, [row(1), row(2)])
    strategy.inc_many([(U, [(1, 3, (2,))]), (U, [(1, 3, (2,))]), (U, [(1, 5, (5, 2))])])
    assert mentions(strategy) == {1: "2,5"}
    assert counts(strategy) == (5, {1: 5, 2: 0})
    strategy.read(U, 1, 1, 5)
    assert mentions(strategy) == {1: "2,5"}
    strategy.read(U, 1, 2, 5)
    assert mentions(strategy) == {1: "5"}
    strategy.inc_many([(U, [(1, 5, (2,))])])  # redelivered after the read: nothing
    assert mentions(strategy) == {1: "5"}
    strategy.read(U, 1, 5, 5)
    assert mentions(strategy) == {}


def test_mentions_go_with_a_leave_and_a_rejoin_starts_without(strategy):
    """Leaving deletes the mentions; a rejoin keeps only mentions above its read pointer."""
    strategy.load(U, [row(1)])
    strategy.inc_many([(U, [(1, 2, (2,))])])
    strategy.member(U, row(1, rev=2, active=False))
    assert mentions(strategy) == {}
    strategy.inc_many([(U, [(1, 2, (2,))]), (U, [(1, 4, (4,))])])  # late, after the leave
    strategy.member(U, row(1, rev=3, read=3, top=3))  # rejoin at 3: seq 4 came after it
    assert mentions(strategy) == {1: "4"}


def test_load_merges_the_truths_mentions_with_newer_ones(strategy):
    """A load keeps the mentions Redis got after the rows were read (above the row's top),
    drops those the truth does not have below it, and adds the rows' own, above the read
    pointer."""
    strategy.inc_many([(U, [(1, 6, (6,))]), (U, [(1, 4, (4,))])])
    strategy.load(U, [row(1, read=2, top=5, mentions=(1, 3, 5))])
    assert mentions(strategy) == {1: "3,5,6"}
    assert counts(strategy) == (4, {1: 4})


def test_a_recall_takes_one_unread_from_who_had_not_read_it_once(strategy):
    """A recall above the read pointer takes one unread (and its mention) once; at or below
    it, nothing; before its own increment, the count is right once that arrives."""
    strategy.load(U, [row(1, top=0), row(2, top=0, muted=True)])
    strategy.inc_many([(U, [(1, 5, (3,)), (2, 2)])])
    strategy.read(U, 1, 2, 5)
    assert counts(strategy) == (3, {1: 3, 2: 2})
    assert strategy.recall(U, 1, 3) == -1
    assert strategy.recall(U, 1, 3) == 0  # again: nothing
    assert strategy.recall(U, 1, 1) == 0  # read already
    assert counts(strategy) == (2, {1: 2, 2: 2}) and mentions(strategy) == {}
    assert strategy.recall(U, 2, 1) == 0  # muted: out of the badge
    assert counts(strategy) == (2, {1: 2, 2: 1})
    assert strategy.recall(U, 1, 8) == 2  # not counted yet: the top rises to it, minus it
    strategy.inc_many([(U, [(1, 8)])])
    assert counts(strategy) == (4, {1: 4, 2: 1})
    strategy.read(U, 1, 8, 8)
    assert counts(strategy) == (0, {1: 0, 2: 1}) and "x:1" not in strategy.fetch(U)


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("inc"),
            st.integers(1, 3),
            st.integers(1, 12),
            st.lists(st.integers(1, 12), max_size=3),
        ),
        st.tuples(st.just("read"), st.integers(1, 3), st.integers(0, 12)),
        st.tuples(
            st.just("member"),
            st.integers(1, 3),
            st.integers(1, 12),
            st.booleans(),
            st.booleans(),
            st.integers(0, 12),
            st.integers(0, 3),  # mode generation
            st.booleans(),  # channel form
            st.lists(st.integers(1, 12), max_size=2),  # mention_all seqs of a conversion
            st.lists(st.integers(1, 12), max_size=2),  # recalled seqs of a conversion
        ),
        st.tuples(
            st.just("load"),
            st.integers(1, 3),
            st.integers(0, 12),
            st.lists(st.integers(1, 12), max_size=3),
            st.integers(0, 3),
            st.booleans(),
            st.lists(st.integers(1, 12), max_size=2),  # the truth's recalled seqs
        ),
        st.tuples(st.just("recall"), st.integers(1, 3), st.integers(1, 12)),
    ),
    max_size=25,
)


def apply(strategy, user_id, op):
    kind, cid = op[0], op[1]
    try:
        if kind == "inc":
            mentioned = tuple(s for s in op[3] if s <= op[2])  # a batch's mentions are <= top
            strategy.inc_many([(user_id, [(cid, op[2], mentioned)])])
        elif kind == "read":
            strategy.read(user_id, cid, op[2], op[2])
        elif kind == "recall":
            strategy.recall(user_id, cid, op[2])
        elif kind == "member":
            _, _, rev, active, muted, seq, gen, channel, alls, recalled = op
            strategy.member(
                user_id,
                row(
                    cid,
                    rev,
                    active,
                    muted,
                    read=seq,
                    top=seq,
                    mentions=alls,
                    gen=gen,
                    channel=channel,
                    recalled=recalled,
                ),
            )
        else:
            truth = [s for s in op[3] if s <= op[2]]
            recalled = [s for s in op[6] if s <= op[2]]
            strategy.load(
                user_id,
                [
                    row(
                        cid,
                        1,
                        True,
                        False,
                        0,
                        op[2],
                        mentions=truth,
                        gen=op[4],
                        channel=op[5],
                        recalled=recalled,
                    )
                ],
            )
    except (CountersNotLoaded, CountersNotMember) as exc:
        return type(exc).__name__
    return None


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_lua_scripts_match_their_python_mirror(ops):
    """Any sequence of operations leaves the same hash under Lua and under the Python
    transitions, and refuses the same reads."""
    lua, python = get_strategy("lua"), get_strategy("watch")
    lua.client.delete(keys.counters(1), keys.counters(2))
    for op in ops:
        assert apply(lua, 1, op) == apply(python, 2, op), op
        assert lua.fetch(1) == python.fetch(2), op


def test_a_late_call_of_an_older_generation_keeps_the_conversion(strategy):
    """A conversion re-sends a member's row with a new generation; the join that came before
    it, applied late, updates the membership but never turns the form back."""
    strategy.load(U, [])
    strategy.member(U, row(1, rev=2, read=3, top=5, gen=1, channel=True))  # the conversion
    strategy.member(U, row(1, rev=1, read=0, top=4, gen=0))  # the join, late
    strategy.member(U, row(1, rev=3, muted=True, read=3, top=5, gen=0))  # a mute, late too
    fields = strategy.fetch(U)
    assert fields["c:1"] == "1" and "u:1" not in fields and fields["m:1"] == "1"
    assert counts(strategy) == (0, {})  # the stored badge leaves the channel form out
    # back to the aggregate form: the unread is counted in the stored badge again
    strategy.member(U, row(1, rev=3, muted=False, read=3, top=9, gen=2, mentions=(2, 8)))
    assert counts(strategy) == (0, {1: 6})  # still muted: rev 3 says so, not this row
    assert mentions(strategy) == {1: "8"}


def test_a_rejoin_takes_the_form_of_its_generation(strategy):
    """A leave drops the form; a rejoin of the same generation takes the row's form again
    (found by the state machine: a member rejoining a channel-mode group came back in the
    aggregate form and never saw the group's messages)."""
    strategy.load(U, [])
    strategy.member(U, row(1, rev=1, read=0, top=0, gen=1, channel=True))
    strategy.member(U, row(1, rev=2, active=False, read=0, top=3, gen=1, channel=True))
    strategy.member(U, row(1, rev=3, read=3, top=3, gen=1, channel=True))
    fields = strategy.fetch(U)
    assert fields.get("c:1") == "1" and "u:1" not in fields
