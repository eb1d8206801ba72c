"""Recall and edit reach every device (issue 15): a recall or an edit made on the phone is a
``recall``/``edit`` entry on the desk (offline, through ``/sync``) and on every member's
devices, a live frame on a connected desk (small groups: the store's poke; channel-mode
groups: the relay), and a device that comes back after the store lost them sees the final
state in the gap snapshot and in history."""

import json

import pytest

from delivery.pipeline import delivery_drain
from offline import keys, store
from tests.offline.conftest import first_sync, pull, pull_all
from tests.offline.test_live import frames_until, ws
from tests.offline.test_live_channels import channel_server, next_frame, settle  # noqa: F401
from tests.offline.test_sync import group
from tests.offline.test_sync_channels import MIN, large_group

pytestmark = pytest.mark.django_db(transaction=True)


def recall(member, cid, seq):
    response = member.delete(f"/conversations/{cid}/messages/{seq}")
    assert response.status_code == 200, response.content
    return response.json()


def edit(member, cid, seq, body):
    response = member.client.patch(
        f"/api/v1/conversations/{cid}/messages/{seq}",
        json.dumps({"body": body}),
        content_type="application/json",
        headers=member._headers(None),
    )
    assert response.status_code == 200, response.content
    return response.json()


def test_a_recall_and_an_edit_on_the_phone_reach_the_desk_offline(make_member, second_device):
    """The desk, offline meanwhile, pulls a recall entry (the tombstone) and an edit entry (the
    new body); the other member's device gets the same."""
    alice, bob = make_member("alice"), make_member("bob")
    desk = second_device(alice, "desk")
    cid = group(alice, bob)
    s1 = alice.send(cid, "oops")["seq"]
    s2 = alice.send(cid, "tpyo")["seq"]
    delivery_drain()
    v_desk, v_bob = first_sync(desk), first_sync(bob)
    recall(alice, cid, s1)
    edit(alice, cid, s2, "typo")
    for device, since in ((desk, v_desk), (bob, v_bob)):
        entries, _ = pull_all(device, since)
        assert [(e["type"], e["seq"]) for e in entries] == [("recall", s1), ("edit", s2)]
        assert entries[0]["message"]["deleted"] is True and entries[0]["message"]["body"] == ""
        assert entries[1]["message"]["body"] == "typo"
        assert entries[1]["message"]["edit_count"] == 1


def test_a_device_back_after_the_store_lost_them_sees_the_final_state(make_member):
    """The gap snapshot and history show the tombstone and the edited body."""
    alice, bob = make_member("alice"), make_member("bob")
    since = first_sync(bob)
    cid = group(alice, bob)
    s1 = alice.send(cid, "secret")["seq"]
    s2 = alice.send(cid, "draft")["seq"]
    delivery_drain()
    recall(alice, cid, s1)
    edit(alice, cid, s2, "final")
    store.client().delete(keys.log(bob.id))
    page = pull(bob, since)
    assert page["gap"] is True
    (conversation,) = page["snapshot"]["conversations"]
    shown = {m["seq"]: m for m in conversation["messages"]}
    assert shown[s1]["deleted"] is True and shown[s1]["body"] == ""
    assert shown[s2]["body"] == "final" and shown[s2]["edit_count"] == 1
    assert conversation["unread"] == 1 and page["snapshot"]["badge"] == 1
    history = bob.get(f"/conversations/{cid}/messages").json()["messages"]
    assert [(m["seq"], m["deleted"], m["body"]) for m in history] == [
        (s1, True, ""),
        (s2, False, "final"),
    ]


def test_a_recall_on_the_phone_reaches_the_connected_desk(poke_server, make_member, second_device):
    """Online: the desk's socket gets the recall entry live (the store's poke), and bob's
    badge drops."""
    alice, bob = make_member("alice"), make_member("bob")
    desk = second_device(alice, "desk")
    cid = group(alice, bob)
    s1 = alice.send(cid, "gone soon")["seq"]
    delivery_drain()
    since = first_sync(desk)
    with ws(poke_server, desk) as sock:
        frames_until(sock, since)
        recall(alice, cid, s1)
        latest = store.latest_version(alice.id)
        frames = frames_until(sock, latest)
    entries = [e for f in frames for e in f["entries"] if e["version"] > since]
    assert [(e["type"], e["seq"]) for e in entries] == [("recall", s1)]
    assert entries[0]["message"]["deleted"] is True
    # the frame carries the badge (the recalled message no longer counts) and its version
    assert frames[-1]["badge"] == 0 and frames[-1]["badge_version"] == latest
    assert bob.unread()["badge"] == 0


def test_a_recall_in_a_large_group_reaches_connected_sockets(
    settings,
    channel_server,  # noqa: F811
    make_member,
    second_device,
):
    """Channel mode: no entry per member; the sockets get a ``channel_op`` frame with the
    message as it is now (a tombstone), and an edit likewise."""
    settings.LARGE_GROUP_MIN_MEMBERS = MIN
    settings.LARGE_GROUP_EXIT_MEMBERS = MIN - 2
    owner, bob, *others = [make_member() for _ in range(MIN)]
    desk = second_device(owner, "desk")
    cid = large_group(owner, bob, *others)
    s1 = owner.send(cid, "to all")["seq"]
    s2 = owner.send(cid, "draft")["seq"]
    logs = store.client().zcard(keys.log(bob.id))
    with ws(channel_server, bob) as b, ws(channel_server, desk) as d:
        settle(b)
        settle(d)
        recall(owner, cid, s1)
        for sock in (b, d):
            frame = next_frame(sock, "channel_op")
            assert frame is not None, "no channel_op frame"
            assert frame["op"] == "recall" and frame["seq"] == s1
            assert frame["message"]["deleted"] is True
        edit(owner, cid, s2, "final")
        frame = next_frame(b, "channel_op")
        assert frame["op"] == "edit" and frame["message"]["body"] == "final"
    assert store.client().zcard(keys.log(bob.id)) == logs  # no entry per member
    assert bob.unread()["conversations"] == {str(cid): 1}
