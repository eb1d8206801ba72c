"""Retention of the offline store: at most OFFLINE_MAX_ENTRIES per user (oldest dropped on
write), the periodic trim (age, and entries every device acknowledged), and the gap snapshot
a device behind the store gets, checked against PostgreSQL."""

import pytest

from counters.selectors import counters_truth
from delivery.pipeline import delivery_drain
from imcore.models import Conversation, Membership, Message
from offline import keys, services, store
from tests.offline.conftest import first_sync, pull, pull_all
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)


def snapshot_truth(user_id: int) -> dict:
    """What the snapshot must say, straight from the tables."""
    out = {}
    for m in Membership.objects.filter(user_id=user_id, left_at__isnull=True):
        c = Conversation.objects.get(pk=m.conversation_id)
        last = Message.objects.filter(conversation=c).order_by("-seq")[:3]
        out[c.pk] = {
            "last_seq": c.last_seq,
            "read_seq": m.last_read_seq,
            "unread": Message.objects.filter(conversation=c, seq__gt=m.last_read_seq).count(),
            "muted": m.muted,
            "bodies": [x.body for x in reversed(last)],
        }
    return out


def snapshot_seen(snapshot: dict) -> dict:
    return {
        c["conversation_id"]: {
            "last_seq": c["last_seq"],
            "read_seq": c["read_seq"],
            "unread": c["unread"],
            "muted": c["muted"],
            "bodies": [m["body"] for m in c["messages"]],
        }
        for c in snapshot["conversations"]
    }


def test_past_max_entries_the_oldest_go_and_a_device_behind_gets_the_snapshot(
    make_member, second_device, settings
):
    settings.OFFLINE_MAX_ENTRIES = 20
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    laptop = second_device(alice)
    behind = first_sync(laptop)
    team = group(bob, alice, carol)
    direct = alice.post("/conversations", {"kind": "direct", "members": [carol.id]}).json()["id"]
    quiet = group(carol, alice, title="quiet")
    for i in range(30):
        bob.send(team, f"t{i}")
    carol.send(direct, "psst")
    carol.send(quiet, "muted news")
    delivery_drain()
    assert alice.post(f"/conversations/{quiet}/mute", {"muted": True}).status_code == 200
    assert alice.post(f"/conversations/{team}/read", {"seq": 12}).status_code == 200

    log = store.client().zrange(keys.log(alice.id), 0, -1, withscores=True)
    latest = pull(alice, 0)["latest_version"]
    assert len(log) == 20
    assert [int(score) for _, score in log] == list(range(latest - 19, latest + 1))

    page = pull(laptop, behind)
    assert page["gap"] is True and page["entries"] == [] and page["has_more"] is False
    snapshot = page["snapshot"]
    assert snapshot_seen(snapshot) == snapshot_truth(alice.id)
    assert snapshot["badge"] == counters_truth(user_id=alice.id).badge == (30 - 12) + 1
    assert page["latest_version"] == snapshot["latest_version"] == latest

    # from the snapshot's version on, entries flow again
    bob.send(team, "after the gap")
    delivery_drain()
    entries, _ = pull_all(laptop, page["latest_version"])
    assert [e["message"]["body"] for e in entries] == ["after the gap"]


def test_a_device_within_the_window_gets_entries_not_the_snapshot(make_member, settings):
    settings.OFFLINE_MAX_ENTRIES = 10
    alice, bob = make_member("alice"), make_member("bob")
    team = group(bob, alice)
    for i in range(15):
        bob.send(team, f"t{i}")
    delivery_drain()
    latest = pull(alice, 0)["latest_version"]
    page = pull(alice, latest - 10)
    assert page["gap"] is False and len(page["entries"]) == 10
    assert pull(alice, latest - 11)["gap"] is True


def test_trim_drops_entries_past_the_retention(make_member, settings):
    alice, bob = make_member("alice"), make_member("bob")
    since = first_sync(alice)
    team = group(bob, alice)
    for i in range(5):
        bob.send(team, f"t{i}")
    delivery_drain()
    assert len(pull_all(alice, since)[0]) == 6
    settings.OFFLINE_RETENTION_S = 3600
    assert services.offline_trim() == (2, 0)  # young entries stay
    settings.OFFLINE_RETENTION_S = 0
    users, dropped = services.offline_trim()
    # alice: her join + 5 messages; bob: 5 messages (his store started with the group in it)
    assert users == 2 and dropped == 6 + 5
    assert store.client().zcard(keys.log(alice.id)) == 0
    page = pull(alice, since)
    assert page["gap"] is True
    assert snapshot_seen(page["snapshot"]) == snapshot_truth(alice.id)


def test_trim_drops_what_every_device_acknowledged(make_member, second_device):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    since = first_sync(alice)
    team = group(bob, alice)
    for i in range(6):
        bob.send(team, f"t{i}")
    delivery_drain()
    entries, latest = pull_all(alice, since)
    versions = [e["version"] for e in entries]
    assert alice.post("/sync/ack", {"version": versions[4]}).status_code == 200
    assert laptop.post("/sync/ack", {"version": versions[2]}).status_code == 200
    services.offline_flush_acks()
    services.offline_trim()
    # the laptop acked less: only what both devices hold went
    left = [int(s) for _, s in store.client().zrange(keys.log(alice.id), 0, -1, withscores=True)]
    assert left == versions[3:]
    assert pull(laptop, versions[2])["entries"][0]["version"] == versions[3]
    # a device that logs in later starts from the snapshot
    page = pull(second_device(alice, "tablet"), 0)
    assert page["gap"] is True
    assert snapshot_seen(page["snapshot"]) == snapshot_truth(alice.id)
