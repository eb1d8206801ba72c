"""Redis refusing connections mid-request: the API answers 503, keeps what it stored, and the
client's retry repairs the counters (no mocks: the client points at a closed port)."""

from unittest.mock import ANY

from delivery.pipeline import delivery_drain
from imcore.models import Message
from tests.helpers import store_down


def test_send_with_redis_down_keeps_the_message_and_the_retry_counts_it(
    transactional_db, make_member, settings
):
    """A send whose counter hand-over fails answers 503 with the message stored; the retry
    with the same client_msg_id answers 200 and the recipient's count comes out right."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = alice.post("/conversations", {"kind": "group", "members": [bob.id]}).json()["id"]
    assert bob.unread()["badge"] == 0
    body = {"body": "hello", "client_msg_id": "retry-me"}
    with store_down(settings):
        failed = alice.post(f"/conversations/{gid}/messages", body)
    assert failed.status_code == 503 and failed.json()["error"] == "counters_unavailable"
    assert Message.objects.filter(client_msg_id="retry-me").count() == 1
    retried = alice.post(f"/conversations/{gid}/messages", body)
    assert retried.status_code == 200 and retried.json()["seq"] == 1
    delivery_drain()
    assert bob.unread() == {"badge": 1, "conversations": {str(gid): 1}, "mentions": {}}
    assert Message.objects.filter(client_msg_id="retry-me").count() == 1


def test_read_with_redis_down_is_kept_and_the_retry_applies_it(
    transactional_db, make_member, settings
):
    """A mark-read whose Redis update fails answers 503 with the read pointer stored; the
    retry returns the right counts."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = alice.post("/conversations", {"kind": "group", "members": [bob.id]}).json()["id"]
    for i in range(3):
        alice.send(gid, f"m{i}")
    delivery_drain()
    assert bob.unread()["badge"] == 3
    with store_down(settings):
        assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).status_code == 503
    assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).json() == {
        "unread": 1,
        "badge": 1,
        "badge_version": ANY,
    }
