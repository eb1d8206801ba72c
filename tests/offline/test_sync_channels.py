"""Sync for large groups (channel mode): their messages write no entries; ``/sync`` lists the
groups that changed since the device's version in ``channels`` with exact counters; a device
that follows the protocol knows every group's last seq and unread; a second device learns a
read from the ``read`` entry. ``LARGE_GROUP_MIN_MEMBERS`` is ``MIN`` here."""

import json

import pytest

from counters import keys as counter_keys
from counters.redis import get_redis
from delivery.pipeline import delivery_drain
from imcore.models import Conversation, Membership
from offline import keys, store
from tests.offline.conftest import first_sync, pull
from tests.offline.test_sync import group
from tests.offline.test_sync_protocol import apply_entry
from tests.offline.test_sync_protocol import truth as protocol_truth

pytestmark = pytest.mark.django_db(transaction=True)

MIN = 5


@pytest.fixture
def large(settings):
    settings.LARGE_GROUP_MIN_MEMBERS = MIN
    settings.LARGE_GROUP_EXIT_MEMBERS = MIN - 2


def large_group(owner, *others) -> int:
    assert len(others) + 1 >= MIN
    cid = group(owner, *others, title="large")
    assert Conversation.objects.get(pk=cid).mode == Conversation.Mode.CHANNEL
    return cid


def mention(sender, cid: int, user_ids: list[int], body="hey") -> dict:
    response = sender.post(
        f"/conversations/{cid}/messages",
        {"body": body, "client_msg_id": f"mention-{body}-{cid}", "mentions": user_ids},
    )
    assert response.status_code == 201, response.content
    return response.json()


def read(member, cid: int, seq: int) -> None:
    response = member.post(f"/conversations/{cid}/read", {"seq": seq})
    assert response.status_code == 200, response.content


def channels(page: dict) -> dict[int, dict]:
    return {c["conversation_id"]: c for c in page["channels"]}


def expected(member, cid: int) -> dict:
    """The group's counters for ``member`` from PostgreSQL (mentions: the test's own count)."""
    m = Membership.objects.select_related("conversation").get(
        user_id=member.id, conversation_id=cid
    )
    return {
        "conversation_id": cid,
        "last_seq": m.conversation.last_seq,
        "read_seq": m.last_read_seq,
        "unread": m.conversation.last_seq - m.last_read_seq,
    }


def test_messages_write_no_entries_and_sync_lists_the_group(large, make_member):
    owner, bob, *others = [make_member() for _ in range(MIN)]
    v_bob = first_sync(bob)
    cid = large_group(owner, bob, *others)
    page = pull(bob, v_bob)
    assert [e["type"] for e in page["entries"]] == ["join"]
    v_bob = page["latest_version"]
    latest_before = store.latest_version(bob.id)

    owner.send(cid, "one")
    mention(owner, cid, [bob.id])
    owner.send(cid, "three")
    delivery_drain()

    assert store.latest_version(bob.id) == latest_before  # no entry for bob
    page = pull(bob, v_bob)
    assert page["entries"] == []
    assert channels(page) == {cid: {**expected(bob, cid), "unread_mentions": 1}}
    assert channels(page)[cid]["last_seq"] == 3 and channels(page)[cid]["unread"] == 3
    # The sender's own sends are read; a device new to the user lists every group.
    assert channels(pull(owner, 0))[cid] == {**expected(owner, cid), "unread_mentions": 0}
    assert expected(owner, cid)["unread"] == 0


def test_a_group_that_did_not_change_since_the_version_is_not_listed(large, make_member):
    owner, bob, *others = [make_member() for _ in range(MIN)]
    cid = large_group(owner, bob, *others)
    other = group(owner, bob, title="small")
    owner.send(cid, "before")
    v = first_sync(bob)
    # An entry after the channel's last change: a device at it knows the group already.
    owner.send(other, "small talk")
    delivery_drain()
    page = pull(bob, v)
    v = page["entries"][-1]["version"]
    get_redis().hset(counter_keys.channel(cid), "ms", 1)  # the top changed long ago
    assert cid not in channels(pull(bob, v))
    owner.send(cid, "after")
    assert channels(pull(bob, v))[cid]["last_seq"] == 2


def test_a_change_stamped_by_a_clock_behind_is_still_listed(large, make_member):
    """The channel's ``ms`` comes from the clock of the conversation's Redis node, the entry's
    from the user's: a node 1 s behind stamps a change after the device's version earlier than
    it. The margin (``SYNC_CHANNELS_MARGIN_MS``) keeps the group listed."""
    owner, bob, *others = [make_member() for _ in range(MIN)]
    cid = large_group(owner, bob, *others)
    other = group(owner, bob, title="small")
    v = first_sync(bob)
    owner.send(other, "small talk")
    delivery_drain()
    page = pull(bob, v)
    entry = page["entries"][-1]
    v = entry["version"]
    at_ms = next(
        store.Entry.parse(m).at_ms for m in get_redis().zrangebyscore(keys.log(bob.id), v, v)
    )
    owner.send(cid, "after the version")  # bob's device has not seen it
    get_redis().hset(counter_keys.channel(cid), "ms", at_ms - 1000)  # a clock 1 s behind
    listed = channels(pull(bob, v))
    assert cid in listed, "a change after the device's version was not listed"
    assert listed[cid]["last_seq"] == 1


def test_no_entry_at_since_lists_every_group(large, make_member):
    owner, bob, *others = [make_member() for _ in range(MIN)]
    cid = large_group(owner, bob, *others)
    get_redis().hset(counter_keys.channel(cid), "ms", 1)
    assert cid in channels(pull(bob, 0))
    v = first_sync(bob)
    get_redis().zremrangebyscore(keys.log(bob.id), v, v)  # trimmed away
    assert cid in channels(pull(bob, v))


def test_the_gap_answer_lists_every_group(large, make_member):
    """A prepared snapshot may be older than the groups' last messages (they write no entry,
    so it still counts as current): the gap answer lists every group as it is now."""
    owner, bob, *others = [make_member() for _ in range(MIN)]
    cid = large_group(owner, bob, *others)
    owner.send(cid, "one")
    page = pull(bob, 0)
    assert page["gap"]
    assert channels(page)[cid] == {**expected(bob, cid), "unread_mentions": 0}


def follow(device, since: int, limit: int, state: dict) -> int:
    """Apply pages as a client does (entries, then ``channels``, keeping the highest seqs)
    until ``has_more`` is false; returns the version reached."""
    while True:
        page = pull(device, since, limit)
        if page["gap"]:
            state.clear()
            for c in page["snapshot"]["conversations"]:
                state[c["conversation_id"]] = {k: c[k] for k in ("last_seq", "read_seq")}
            since = page["latest_version"]
        for e in page["entries"]:
            apply_entry(state, e, device.id)
            since = e["version"]
        for ch in page["channels"]:
            c = state.setdefault(ch["conversation_id"], {"last_seq": 0, "read_seq": 0})
            c["last_seq"] = max(c["last_seq"], ch["last_seq"])
            c["read_seq"] = max(c["read_seq"], ch["read_seq"])
        if not page["has_more"]:
            return since


def known(state: dict) -> dict:
    return {
        cid: (c["last_seq"], c["read_seq"], c["last_seq"] - c["read_seq"])
        for cid, c in state.items()
    }


def truth(user_id: int) -> dict:
    """PostgreSQL's ``(last seq, read seq, unread)`` of each of the user's conversations."""
    return {cid: held[:3] for cid, held in protocol_truth(user_id).items()}


@pytest.mark.parametrize("limit", [1, 3, 200])
def test_a_device_following_the_protocol_knows_every_group(large, make_member, limit):
    owner, bob, carol, *others = [make_member() for _ in range(MIN + 1)]
    state: dict = {}
    v = follow(bob, 0, limit, state)
    big1 = large_group(owner, bob, carol, *others)
    small = group(carol, bob, title="small")
    for i in range(4):
        owner.send(big1, f"b{i}")
        carol.send(small, f"s{i}")
        delivery_drain()
        v = follow(bob, v, limit, state)
        assert known(state) == truth(bob.id)
    big2 = large_group(carol, bob, owner, *others)
    for i in range(3):
        carol.send(big2, f"c{i}")
    bob.send(big1, "bob speaks")
    read(bob, big2, 2)
    owner.send(big1, "more")
    delivery_drain()
    v = follow(bob, v, limit, state)
    assert known(state) == truth(bob.id)
    assert known(state)[big1] == (6, 5, 1) and known(state)[big2] == (3, 2, 1)


def test_a_second_device_learns_a_read_in_a_large_group(large, make_member, second_device):
    owner, bob, *others = [make_member() for _ in range(MIN)]
    laptop = second_device(bob)
    v = first_sync(laptop)
    cid = large_group(owner, bob, *others)
    for i in range(3):
        owner.send(cid, f"m{i}")
    v = pull(laptop, v)["latest_version"]
    read(bob, cid, 2)  # on the phone
    page = pull(laptop, v)
    reads = [e for e in page["entries"] if e["type"] == "read"]
    assert [(e["conversation_id"], e["seq"]) for e in reads] == [(cid, 2)]
    listed = channels(page).get(cid)
    assert listed is None or (listed["read_seq"], listed["unread"]) == (2, 1)
    assert json.dumps(page)  # plain JSON
