"""Every badge imcore hands out carries ``badge_version`` (issue 15): ``GET /unread``, the read
and mute answers, ``/sync`` (and its gap snapshot) and the Matrix push payload
(``counts.badge_version``). Across interleaved reads, sends, recalls, syncs and pushes, the
version of the badges one user gets never goes down, and the newest badge is the truth."""

import random
import time

import pytest

from counters.selectors import counters_truth
from delivery.pipeline import delivery_drain
from offline import push
from tests.helpers import RoundTrips
from tests.offline.conftest import pull
from tests.offline.test_push import Gateway, with_pushkey
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def gateway(settings):
    g = Gateway()
    settings.PUSH_BACKEND = "matrix"
    settings.PUSH_GATEWAY_URL = g.url
    settings.PUSH_INTERVAL_S = 0.001
    yield g
    g.server.shutdown()


def test_the_badge_version_never_goes_down(gateway, make_member, second_device):
    """A random interleaving of the calls that hand out a badge and of the changes that move
    it: the versions the user sees, in the order they were handed out, never go down."""
    alice, bob = make_member("alice"), make_member("bob")
    tablet = with_pushkey(second_device(alice, "tablet"), "tablet-key")
    cid = group(bob, alice)
    rng = random.Random(15)
    seen: list[tuple[str, int, int]] = []  # (where, version, badge)
    sent: list[int] = []
    for step in range(40):
        kind = rng.choice(["send", "send", "unread", "read", "mute", "sync", "push", "recall"])
        if kind == "send":
            sent.append(bob.send(cid, f"m{step}", client_msg_id=f"bv-{step}")["seq"])
            delivery_drain()
        elif kind == "recall" and sent:
            assert bob.delete(f"/conversations/{cid}/messages/{sent.pop()}").status_code == 200
        elif kind == "unread":
            answer = alice.get("/unread").json()
            seen.append(("unread", answer["badge_version"], answer["badge"]))
        elif kind == "read" and sent:
            answer = alice.post(f"/conversations/{cid}/read", {"seq": rng.choice(sent)}).json()
            seen.append(("read", answer["badge_version"], answer["badge"]))
        elif kind == "mute":
            answer = alice.post(f"/conversations/{cid}/mute", {"muted": rng.random() < 0.3})
            answer = answer.json()
            seen.append(("mute", answer["badge_version"], answer["badge"]))
        elif kind == "sync":
            page = pull(tablet, 0)
            seen.append(("sync", page["badge_version"], page["badge"]))
        elif kind == "push":
            push.push_badge_changed(user_ids=[alice.id], alert=False)
            time.sleep(0.005)
            before = len(gateway.pushes("tablet-key"))
            push.push_send_due()
            for p in gateway.pushes("tablet-key")[before:]:
                seen.append(("push", p["counts"]["badge_version"], p["counts"]["unread"]))
    kinds = {where for where, _, _ in seen}
    assert {"unread", "read", "mute", "sync", "push"} <= kinds, kinds
    versions = [v for _, v, _ in seen]
    assert versions == sorted(versions), seen
    assert versions[-1] > versions[0]
    final = alice.get("/unread").json()
    assert final["badge_version"] >= versions[-1]
    assert final["badge"] == counters_truth(user_id=alice.id).badge


def test_unread_reads_its_version_and_counters_in_one_round_trip(make_member, monkeypatch):
    """``GET /unread`` after the token's GET: one Redis round trip for the badge version and
    the counter hash (the version first in it). With the sync state gone from Redis, the
    version is loaded and the hash read again after it: the answer is still the truth."""
    from offline import keys as offline_keys
    from offline.store import client

    alice, bob = make_member("alice"), make_member("bob")
    cid = group(bob, alice)
    bob.send(cid, "one", client_msg_id="rt-1")
    delivery_drain()
    assert alice.get("/unread").status_code == 200  # token cached
    trips = RoundTrips(monkeypatch)
    answer = alice.get("/unread").json()
    assert trips.count == 2
    assert (answer["badge"], answer["conversations"]) == (1, {str(cid): 1})
    client().delete(offline_keys.state(alice.id))
    again = alice.get("/unread").json()
    assert again["badge_version"] >= answer["badge_version"]
    assert (again["badge"], again["conversations"]) == (1, {str(cid): 1})


def test_a_read_is_one_redis_round_trip_after_the_token(make_member, monkeypatch):
    """``POST …/read`` after the token's GET: one Redis round trip for the badge version, the
    read script with the counter hash and the read's sync entry (three before), and the
    user's devices find the read in the log. With the sync state gone from Redis, the
    version is loaded and the counts read again after it; with the counters gone, they are
    rebuilt. Each answer is the truth and versions never go back."""
    from counters import keys as counter_keys
    from offline import keys as offline_keys
    from offline.store import client

    alice, bob = make_member("alice"), make_member("bob")
    cid = group(bob, alice)
    for n in range(3):
        bob.send(cid, f"m{n}", client_msg_id=f"read-rt-{n}")
    delivery_drain()
    since = pull(alice, 0)["latest_version"]
    trips = RoundTrips(monkeypatch)
    first = alice.post(f"/conversations/{cid}/read", {"seq": 1}).json()
    assert trips.count == 2
    assert (first["unread"], first["badge"]) == (2, 2)
    entries = pull(alice, since)["entries"]
    assert [(e["type"], e["seq"]) for e in entries] == [("read", 1)]
    assert entries[0]["version"] <= first["badge_version"] + 1
    client().delete(offline_keys.state(alice.id))
    second = alice.post(f"/conversations/{cid}/read", {"seq": 2}).json()
    assert (second["unread"], second["badge"]) == (1, 1)
    client().delete(counter_keys.counters(alice.id))
    third = alice.post(f"/conversations/{cid}/read", {"seq": 3}).json()
    assert (
        (third["unread"], third["badge"]) == (0, counters_truth(user_id=alice.id).badge) == (0, 0)
    )
    versions = [a["badge_version"] for a in (first, second, third)]
    assert versions == sorted(versions), versions
