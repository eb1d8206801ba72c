"""Sync paths across a real worker (no Timer, no beat: only what the request paths send
runs): a device that comes back by a pull after ``SYNC_AWAY_AFTER_S`` gets its package
prepared, a burst of acks reaching ``SYNC_ACK_FLUSH_THRESHOLD`` is flushed at once, and an ack
flusher yields while another one holds the flush lock."""

import json
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from delivery.pipeline import delivery_drain
from imcore.models import Device
from offline import keys, services, store
from offline.apis import rendered
from offline.tasks import flush_acks
from tests.conftest import broker_idle, running_worker, wait_until
from tests.counters.test_aggregator_edges import tasks_run
from tests.offline.conftest import first_sync, pull
from tests.offline.test_sync import group

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


@pytest.fixture(scope="module")
def worker(django_db_setup, django_db_blocker):
    with running_worker() as proc:
        yield proc


def device(member, device_id: str = "phone") -> Device:
    return Device.objects.get(user=member.user, device_id=device_id)


def acked(member) -> set[int]:
    """The acked versions PostgreSQL holds for the user's devices."""
    return set(Device.objects.filter(user=member.user).values_list("acked_version", flat=True))


def test_a_device_back_by_a_pull_after_the_away_time_gets_its_package(
    worker, make_member, second_device, settings
):
    """A device unseen for longer than ``SYNC_AWAY_AFTER_S`` pulls: a worker prepares its
    package, and its next pull reads no message rows. A device seen just before pulls and
    gets none prepared."""
    settings.SYNC_AWAY_AFTER_S = 60
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    wait_until(broker_idle)  # the packages prepared at login are built (empty) by now
    team = group(bob, alice)
    since = first_sync(laptop)
    assert laptop.post("/sync/ack", {"version": since}).status_code == 200
    services.offline_flush_acks()  # the ack and the last-seen time reach PostgreSQL
    Device.objects.filter(pk=device(alice, "laptop").pk).update(
        last_seen_at=timezone.now() - timedelta(seconds=120)
    )
    for i in range(30):
        bob.send(team, f"while away {i}")
    delivery_drain()
    phone_since = pull(alice, 0)["latest_version"]  # the phone is here all along

    first = pull(laptop, since, limit=5)  # back: not by a login, by a pull
    pk = device(alice, "laptop").pk
    wait_until(
        lambda: store.client().zcard(keys.package(alice.id, pk)) == 30,
        message="no package was prepared for the device that came back",
    )
    with CaptureQueriesContext(connection) as queries:
        page = pull(laptop, first["entries"][-1]["version"], limit=100)
    assert not [q for q in queries.captured_queries if "imcore_message" in q["sql"]]
    bodies = [e["message"]["body"] for e in first["entries"] + page["entries"] if "message" in e]
    assert bodies == [f"while away {i}" for i in range(30)]
    pull(alice, phone_since)
    wait_until(broker_idle)
    assert not store.client().exists(keys.package(alice.id, device(alice).pk))


def test_acks_reaching_the_threshold_are_flushed_at_once(
    worker, make_member, second_device, settings
):
    """With no periodic flush, acks of fewer devices than ``SYNC_ACK_FLUSH_THRESHOLD`` stay in
    Redis; the ack that reaches it sends the flush and all of them land in PostgreSQL."""
    settings.SYNC_ACK_FLUSH_THRESHOLD = 3
    alice, bob = make_member("alice"), make_member("bob")
    team = group(bob, alice)
    bob.send(team, "hi")
    delivery_drain()
    devices = [alice, second_device(alice, "d1"), second_device(alice, "d2")]
    latest = pull(alice, 0)["latest_version"]
    for d in devices[:2]:
        assert d.post("/sync/ack", {"version": latest}).status_code == 200
    time.sleep(1.0)
    wait_until(broker_idle)
    assert acked(alice) == {0}
    assert devices[2].post("/sync/ack", {"version": latest}).status_code == 200
    wait_until(lambda: acked(alice) == {latest}, message="the acks were not flushed at once")


def test_an_ack_flusher_yields_while_another_holds_the_lock(worker, make_member):
    """A flush that finds the flush lock held writes nothing and leaves the acks waiting; the
    next flush, once the lock is free, writes them."""
    alice, bob = make_member("alice"), make_member("bob")
    team = group(bob, alice)
    bob.send(team, "hi")
    delivery_drain()
    latest = pull(alice, 0)["latest_version"]
    assert alice.post("/sync/ack", {"version": latest}).status_code == 200
    pk = device(alice).pk
    lock = store.flush_lock()
    assert lock.acquire(blocking=False)
    try:
        runs = tasks_run("offline.flush_acks")
        flush_acks.delay()
        wait_until(lambda: tasks_run("offline.flush_acks") == runs + 1 and broker_idle())
        assert Device.objects.get(pk=pk).acked_version == 0
        assert store.acks_pending([pk]) == {pk: latest}
    finally:
        lock.release()
    flush_acks.delay()
    wait_until(lambda: Device.objects.get(pk=pk).acked_version == latest)
    assert not store.client().exists(keys.ACKS_PENDING, keys.ACKS_INFLIGHT)


def test_a_rendered_page_leaves_out_every_none_at_every_depth():
    """``rendered`` takes shortcuts for the entries' usual shapes; every ``None`` still goes,
    as ninja's ``exclude_none`` would drop it (lists keep theirs), whatever the entry."""
    message = {"id": 1, "seq": 2, "body": "b", "mentions": [3], "edited_at": None}
    page = {
        "entries": [
            {"version": 1, "type": "message", "conversation_id": 5, "seq": 2, "message": message},
            {"version": 2, "type": "message", "conversation_id": 5, "seq": 3, "message": None},
            {"version": 3, "type": "join", "conversation_id": 5, "title": None,
             "members": [{"id": 1, "name": None}, None]},
            {"version": 4, "type": "read", "conversation_id": 5, "seq": None},
            {"version": 5, "type": "recall", "conversation_id": 5, "seq": 2,
             "message": {**message}},
        ],
        "latest_version": 5,
        "snapshot": None,
        "channels": [{"conversation_id": 7, "last_seq": None}],
    }  # fmt: skip

    def without_none(value):
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [without_none(v) for v in value]
        return value

    assert json.loads(rendered(page).content) == without_none(page)
