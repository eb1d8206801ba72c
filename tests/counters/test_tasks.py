"""The per-message fan-out (``DELIVERY_WRITE_PATH=fanout``) crosses the queue to a real
worker process."""

from unittest.mock import ANY

import pytest

from counters.selectors import counters_get
from delivery.tasks import fanout_message
from imcore import services
from imcore.models import User
from tests.conftest import broker_idle, wait_until
from tests.helpers import counter_mismatches

pytestmark = [pytest.mark.worker]


@pytest.fixture(autouse=True)
def fanout_path(settings):
    settings.DELIVERY_WRITE_PATH = "fanout"


def test_send_reaches_every_member_through_the_worker(transactional_db, make_member, celery_worker):
    """A message to a 300-member group raises every other member's count once, via the worker;
    the sender's own count stays at zero."""
    alice = make_member("alice")
    others = User.objects.bulk_create(User(username=f"member-{i}") for i in range(299))
    gid = alice.post(
        "/conversations", {"kind": "group", "members": [u.pk for u in others], "title": "big"}
    ).json()["id"]
    alice.send(gid, "one")
    alice.send(gid, "two")
    wait_until(broker_idle, message="the worker did not drain the queue")
    ids = [u.pk for u in others]
    for uid in ids:
        assert counters_get(user_id=uid).conversations == {gid: 2}
    assert alice.unread() == {"badge": 0, "conversations": {str(gid): 0}, "mentions": {}}
    assert counter_mismatches([alice.id, *ids]) == []


def test_task_delivered_twice_counts_once(transactional_db, make_member, celery_worker):
    """The same fan-out task run twice (a redelivery) leaves the count unchanged."""
    alice, bob = make_member("alice"), make_member("bob")
    conv, _ = services.conversation_create(creator=alice.user, kind="direct", member_ids=[bob.id])
    message = alice.send(conv.pk, "hello")
    wait_until(lambda: bob.unread()["badge"] == 1)
    for _ in range(3):
        fanout_message.delay(conversation_id=conv.pk, seq=message["seq"], sender_id=alice.id)
    wait_until(broker_idle)
    assert bob.unread() == {"badge": 1, "conversations": {str(conv.pk): 1}, "mentions": {}}


def test_read_is_immediate_and_survives_late_fanout(transactional_db, make_member, celery_worker):
    """A read answered before the worker ran is not undone when the fan-out lands."""
    alice, bob = make_member("alice"), make_member("bob")
    conv, _ = services.conversation_create(creator=alice.user, kind="direct", member_ids=[bob.id])
    seq = alice.send(conv.pk, "hello")["seq"]
    assert bob.post(f"/conversations/{conv.pk}/read", {"seq": seq}).json() == {
        "unread": 0,
        "badge": 0,
        "badge_version": ANY,
    }
    wait_until(broker_idle)
    fanout_message.delay(conversation_id=conv.pk, seq=seq, sender_id=alice.id)
    wait_until(broker_idle)
    assert bob.unread()["badge"] == 0
