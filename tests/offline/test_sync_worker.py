"""Sync across real Celery processes: the Timer and Aggregator carry a message to the
sender's other device, beat's delayed-ack flush lands acks in PostgreSQL, and a device that
comes back has its package prepared by a worker so its pull reads no message rows."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from imcore import services as im
from imcore.models import Device
from offline import keys, store
from tests.conftest import Member, running_worker, wait_until
from tests.offline.conftest import first_sync, pull, pull_all
from tests.offline.test_sync import group

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def messages_after(member: Member, since: int) -> list[dict]:
    return [e for e in pull_all(member, since)[0] if e["type"] == "message"]


def test_message_reaches_the_senders_other_device_and_acks_land(make_member, second_device):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    team = group(alice, bob)
    since = first_sync(laptop)
    with running_worker(beat=True):
        alice.send(team, "sent from the phone")
        got = wait_until(lambda: messages_after(laptop, since), message="nothing reached laptop")
        assert got[0]["message"]["body"] == "sent from the phone"
        version = got[0]["version"]
        assert laptop.post("/sync/ack", {"version": version}).status_code == 200
        device = Device.objects.get(user=alice.user, device_id="laptop")
        wait_until(
            lambda: Device.objects.get(pk=device.pk).acked_version == version,
            message="beat's ack flush did not write the ack",
        )


def test_a_device_coming_back_gets_its_package_prepared_by_a_worker(make_member, second_device):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    team = group(bob, alice)
    with running_worker(beat=True):
        since = first_sync(laptop)
        assert laptop.post("/sync/ack", {"version": since}).status_code == 200
        device = Device.objects.get(user=alice.user, device_id="laptop")
        wait_until(lambda: Device.objects.get(pk=device.pk).acked_version == since)
        Device.objects.filter(pk=device.pk).update(
            last_seen_at=timezone.now() - timedelta(hours=1)  # the laptop went away
        )
        for i in range(30):
            bob.send(team, f"while away {i}")
        wait_until(lambda: len(messages_after(alice, since)) == 30, message="not recorded")
        # the laptop logs in again: a worker prepares its package
        _, token = im.device_login(
            username="alice", password="pw-for-tests-1", device_id="laptop", platform="desktop"
        )
        laptop = Member(user=alice.user, token=token, client=Client())
        wait_until(
            lambda: store.client().zcard(keys.package(alice.id, device.pk)) == 30,
            message="no package was prepared",
        )
        with CaptureQueriesContext(connection) as queries:
            page = pull(laptop, since)
        assert not [q for q in queries.captured_queries if "imcore_message" in q["sql"]]
        bodies = [e["message"]["body"] for e in page["entries"] if e["type"] == "message"]
        assert bodies == [f"while away {i}" for i in range(30)]
        wait_until(  # the last-seen time reaches PostgreSQL with beat's ack flush
            lambda: (
                Device.objects.get(pk=device.pk).last_seen_at
                > timezone.now() - timedelta(minutes=1)
            ),
            message="last_seen_at was not written",
        )
