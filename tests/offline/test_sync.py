"""Multi-device sync through the API against real PostgreSQL and Redis: entries for every
device of every member, reads, joins/leaves/mutes, paging, idempotence and isolation. The
counter pipeline is drained in-process here; test_sync_worker.py runs it on real workers."""

import pytest

from delivery.pipeline import delivery_drain
from delivery.services import delivery_message_committed
from offline import keys, store
from tests.offline.conftest import first_sync, pull, pull_all

pytestmark = pytest.mark.django_db(transaction=True)


def group(owner, *others, title="team") -> int:
    response = owner.post(
        "/conversations", {"kind": "group", "members": [m.id for m in others], "title": title}
    )
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_message_sent_on_one_device_appears_on_the_other(make_member, second_device):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    v_laptop, v_bob = first_sync(laptop), first_sync(bob)
    cid = group(alice, bob)
    sent = alice.send(cid, "hello from the phone")
    delivery_drain()
    entries, latest = pull_all(laptop, v_laptop)
    assert [e["type"] for e in entries] == ["join", "message"]
    message = entries[1]
    assert message["conversation_id"] == cid
    assert message["seq"] == sent["seq"]
    assert message["message"]["body"] == "hello from the phone"
    assert message["message"]["sender_id"] == alice.id
    assert latest == message["version"]
    # bob (another user) gets the same message in his own store, with his own versions
    bob_entries, _ = pull_all(bob, v_bob)
    assert [(e["type"], e.get("seq")) for e in bob_entries] == [("join", None), ("message", 1)]


def test_read_on_one_device_becomes_a_read_entry_on_the_other(make_member, second_device):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    cid = group(bob, alice)
    for i in range(3):
        bob.send(cid, f"m{i}")
    delivery_drain()
    since = first_sync(laptop)
    assert alice.post(f"/conversations/{cid}/read", {"seq": 2}).status_code == 200
    entries, _ = pull_all(laptop, since)
    assert [(e["type"], e["conversation_id"], e["seq"]) for e in entries] == [("read", cid, 2)]
    # reading the same or an older seq again records nothing new
    assert alice.post(f"/conversations/{cid}/read", {"seq": 2}).status_code == 200
    assert alice.post(f"/conversations/{cid}/read", {"seq": 1}).status_code == 200
    assert pull_all(laptop, entries[-1]["version"])[0] == []


def test_join_mute_leave_entries(make_member):
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    since = first_sync(carol)
    cid = group(alice, bob, title="plans")
    alice.send(cid, "before carol")
    delivery_drain()
    assert alice.post(f"/conversations/{cid}/members", {"user_ids": [carol.id]}).status_code in (
        200,
        201,
    )
    assert carol.post(f"/conversations/{cid}/mute", {"muted": True}).status_code == 200
    alice.send(cid, "after carol joined")
    delivery_drain()
    assert carol.delete(f"/conversations/{cid}/members/{carol.id}").status_code == 204
    alice.send(cid, "after carol left")
    delivery_drain()
    entries, _ = pull_all(carol, since)
    assert [e["type"] for e in entries] == ["join", "mute", "message", "leave"]
    join = entries[0]
    assert join["kind"] == "group" and join["title"] == "plans"
    assert join["last_seq"] == 1 and join["read_seq"] == 1 and join["muted"] is False
    assert entries[1]["muted"] is True
    assert entries[2]["message"]["body"] == "after carol joined"
    versions = [e["version"] for e in entries]
    assert versions == sorted(set(versions))


def test_paging_returns_every_entry_once_in_order(make_member, second_device):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    since = first_sync(laptop)
    cid = group(alice, bob)
    for i in range(25):
        bob.send(cid, f"m{i}")
    delivery_drain()
    entries, latest = pull_all(laptop, since, limit=7)
    messages = [e for e in entries if e["type"] == "message"]
    assert [m["message"]["body"] for m in messages] == [f"m{i}" for i in range(25)]
    versions = [e["version"] for e in entries]
    assert versions == sorted(set(versions)) and versions[-1] == latest
    page = pull(laptop, since, limit=7)
    assert page["has_more"] is True and len(page["entries"]) == 7


def test_repeated_events_and_retried_sends_record_once(make_member, second_device):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    since = first_sync(laptop)
    cid = group(bob, alice)
    sent = bob.send(cid, "once", client_msg_id="same")
    again = bob.post(f"/conversations/{cid}/messages", {"body": "once", "client_msg_id": "same"})
    assert again.status_code == 200
    delivery_message_committed(conversation_id=cid, seq=sent["seq"], sender_id=bob.id)
    delivery_drain()
    delivery_message_committed(conversation_id=cid, seq=sent["seq"], sender_id=bob.id)
    delivery_drain()
    entries, _ = pull_all(laptop, since)
    assert [e["type"] for e in entries] == ["join", "message"]


def test_a_device_never_sees_another_users_entries(make_member):
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    since_carol = first_sync(carol)
    r = alice.post("/conversations", {"kind": "direct", "members": [bob.id]})
    cid = r.json()["id"]
    alice.send(cid, "private")
    assert bob.post(f"/conversations/{cid}/read", {"seq": 1}).status_code == 200
    delivery_drain()
    entries, _ = pull_all(carol, since_carol)
    assert entries == []
    # carol's versions are hers: her latest did not move with alice's and bob's entries
    assert pull(carol, 0)["latest_version"] == since_carol
    assert store.client().zcard(keys.log(carol.id)) == 0


def test_a_message_recorded_before_the_joiners_join_entry_starts_at_their_read_pointer(
    make_member,
):
    """The aggregator may see a new member before the join's own entry reached Redis (the
    join's write comes after its commit): the member's entries start after the read pointer
    the join gave them, and the late join entry still gets recorded."""
    from django.utils import timezone

    from imcore.models import Conversation, Membership
    from offline.services import offline_record_memberships

    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    since = first_sync(carol)
    cid = group(alice, bob)
    for i in range(3):
        alice.send(cid, f"before{i}")
    delivery_drain()
    conversation = Conversation.objects.get(pk=cid)
    joined = Membership.objects.create(
        user=carol.user,
        conversation=conversation,
        last_read_seq=conversation.last_seq,
        joined_at=timezone.now(),
    )  # committed; its sync write has not happened yet
    alice.send(cid, "first after carol joined")
    delivery_drain()
    offline_record_memberships(
        memberships=[joined], conversation=conversation, last_seq=3, change="join"
    )
    entries, _ = pull_all(carol, since)
    assert [(e["type"], e.get("seq")) for e in entries] == [("message", 4), ("join", None)]


def test_a_synced_message_looks_like_the_same_message_from_the_history_call(
    make_member, second_device
):
    alice, bob = make_member("alice"), make_member("bob")
    since = first_sync(bob)
    cid = group(alice, bob)
    alice.send(cid, "same everywhere")
    delivery_drain()
    entries, _ = pull_all(bob, since)
    history = bob.get(f"/conversations/{cid}/messages").json()["messages"]
    assert entries[-1]["message"] == history[0]


def test_a_rejoining_member_gets_nothing_of_what_was_said_while_away(make_member):
    alice, bob = make_member("alice"), make_member("bob")
    since = first_sync(bob)
    cid = group(alice, bob)
    alice.send(cid, "before")
    delivery_drain()
    assert bob.delete(f"/conversations/{cid}/members/{bob.id}").status_code == 204
    alice.send(cid, "while bob was away")
    delivery_drain()
    assert alice.post(f"/conversations/{cid}/members", {"user_ids": [bob.id]}).status_code in (
        200,
        201,
    )
    alice.send(cid, "welcome back")
    delivery_drain()
    entries, _ = pull_all(bob, since)
    assert [(e["type"], e.get("seq")) for e in entries] == [
        ("join", None),
        ("message", 1),
        ("leave", None),
        ("join", None),
        ("message", 3),
    ]


def test_re_sending_a_members_state_does_not_skip_their_queued_messages(make_member):
    """``members_add`` re-sends the state of members named again; when that re-send records an
    entry (an earlier change of theirs was never recorded), messages still queued for them
    must still be recorded afterwards."""
    from imcore.models import Membership

    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    since = first_sync(bob)
    cid = group(alice, bob)
    delivery_drain()
    # bob's mute reached PostgreSQL but not the sync store (its write failed after commit)
    Membership.objects.filter(user=bob.user, conversation_id=cid).update(muted=True, rev=2)
    alice.send(cid, "queued while the re-send happens")  # in the queue, not applied yet
    response = alice.post(f"/conversations/{cid}/members", {"user_ids": [bob.id, carol.id]})
    assert response.status_code in (200, 201)
    delivery_drain()
    entries, _ = pull_all(bob, since)
    assert [(e["type"], e.get("seq")) for e in entries] == [
        ("join", None),
        ("join", None),  # the re-sent state: muted now
        ("message", 1),
    ]
    assert entries[1]["muted"] is True


def test_a_log_lost_apart_from_its_hash_gives_the_gap(make_member):
    alice, bob = make_member("alice"), make_member("bob")
    since = first_sync(bob)
    cid = group(alice, bob)
    alice.send(cid, "kept in PostgreSQL")
    delivery_drain()
    store.client().delete(keys.log(bob.id))  # e.g. evicted by a volatile-* policy
    page = pull(bob, since)
    assert page["gap"] is True
    assert page["snapshot"]["conversations"][0]["messages"][0]["body"] == "kept in PostgreSQL"
