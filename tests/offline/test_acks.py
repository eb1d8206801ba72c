"""Cumulative acks, absorbed like TCP's delayed ack: an older ack changes nothing, and a burst
of acks from many devices reaches PostgreSQL as one UPDATE per flush."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from delivery.pipeline import delivery_drain
from imcore.models import Device
from offline import keys, services, store
from tests.offline.conftest import pull
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)


def writes(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].lstrip().upper().startswith(("UPDATE", "INSERT"))]


@pytest.fixture
def alice_with_entries(make_member):
    alice, bob = make_member("alice"), make_member("bob")
    team = group(bob, alice)
    for i in range(20):
        bob.send(team, f"m{i}")
    delivery_drain()
    return alice


def test_acks_are_cumulative_and_never_move_back(alice_with_entries):
    alice = alice_with_entries
    latest = pull(alice, 0)["latest_version"]
    assert alice.post("/sync/ack", {"version": 5}).json() == {"acked_version": 5}
    assert alice.post("/sync/ack", {"version": 3}).json() == {"acked_version": 5}
    assert services.offline_flush_acks() == 1
    device = Device.objects.get(user=alice.user)
    assert device.acked_version == 5
    assert alice.post("/sync/ack", {"version": 4}).json() == {"acked_version": 5}
    services.offline_flush_acks()
    assert Device.objects.get(pk=device.pk).acked_version == 5
    assert alice.post("/sync/ack", {"version": latest}).json() == {"acked_version": latest}
    services.offline_flush_acks()
    assert Device.objects.get(pk=device.pk).acked_version == latest
    response = alice.post("/sync/ack", {"version": latest + 1})
    assert response.status_code == 400
    assert response.json()["details"] == {"latest_version": latest}


def test_a_burst_of_acks_is_one_write(alice_with_entries, second_device):
    """100 devices ack 10 times each: 1,000 acks, no database write while they arrive, then
    one UPDATE of 100 acks and one of 100 last-seen times."""
    alice = alice_with_entries
    devices = [second_device(alice, f"d{i}") for i in range(100)]
    latest = pull(alice, 0)["latest_version"]  # a new device starts with the snapshot
    versions = list(range(latest - 9, latest + 1))
    with CaptureQueriesContext(connection) as during:
        for v in versions:
            for d in devices:
                assert d.post("/sync/ack", {"version": v}).status_code == 200
    assert writes(during.captured_queries) == []
    with CaptureQueriesContext(connection) as flush:
        assert services.offline_flush_acks() == 100
    assert len(writes(flush.captured_queries)) == 2
    acked = Device.objects.filter(device_id__startswith="d").values_list("acked_version", flat=True)
    assert set(acked) == {versions[-1]}


def test_a_flush_that_died_midway_is_redone(alice_with_entries):
    alice = alice_with_entries
    alice.post("/sync/ack", {"version": 7})
    acks, _ = store.acks_take()  # a flusher took the batch and died before writing it
    assert list(acks.values()) == [7]
    alice.post("/sync/ack", {"version": 9})  # newer acks keep coming meanwhile
    assert services.offline_flush_acks() == 1  # the batch in flight first
    assert Device.objects.get(user=alice.user).acked_version == 7
    assert services.offline_flush_acks() == 1
    assert Device.objects.get(user=alice.user).acked_version == 9
    assert not store.client().exists(keys.ACKS_PENDING, keys.ACKS_INFLIGHT)
