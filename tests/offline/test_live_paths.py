"""``/ws/v1/sync`` paths the other live tests do not reach, against a real uvicorn process:
``ping`` answered ``pong``, and logging in with ``?token=`` as a browser
must (it cannot set headers on a WebSocket)."""

import json
from urllib.parse import quote

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from delivery.pipeline import delivery_drain
from imcore.models import Device
from offline import store
from tests.offline.conftest import first_sync
from tests.offline.test_live import frames_until, ws
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)


def test_ping_is_answered_pong_and_refreshes_presence(server, make_member):
    """A ``ping`` frame is answered ``{"type": "pong"}`` and marks the device online again
    before the answer."""
    alice = make_member("alice")
    with ws(server, alice) as sock:
        frames_until(sock, 0)
        store.presence_leave(user_id=alice.id, device_pk=Device.objects.get(user=alice.user).pk)
        sock.send(json.dumps({"type": "ping"}))
        while (frame := json.loads(sock.recv(timeout=10)))["type"] == "sync":
            pass  # a catch-up of the connection's own heartbeat may come first
        assert frame == {"type": "pong"}
        assert store.presence_online([alice.id])[alice.id]


def test_a_token_in_the_query_string_logs_the_device_in(server, make_member, second_device):
    """``?token=<device token>`` without an Authorization header: the device is online and
    receives its package."""
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    since = first_sync(laptop)
    assert laptop.post("/sync/ack", {"version": since}).status_code == 200
    cid = group(bob, alice)
    bob.send(cid, "hello")
    delivery_drain()
    with connect(f"{server}?token={quote(laptop.token)}", max_queue=None) as sock:
        frames = frames_until(sock, since + 2)
        device = Device.objects.get(user=alice.user, device_id="laptop")
        assert store.presence_online([alice.id])[alice.id] == {device.pk}
    bodies = [e["message"]["body"] for f in frames for e in f["entries"] if e["type"] == "message"]
    assert bodies == ["hello"]


def test_a_bad_token_in_the_query_string_closes_with_4401(server, make_member):
    """A ``?token=`` that is no device's token is refused like a bad header."""
    alice = make_member("alice")
    with connect(f"{server}?token={quote(alice.token[:-2])}") as sock:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                sock.recv(timeout=5)
        assert closed.value.rcvd.code == 4401
    assert not store.presence_online([alice.id])[alice.id]
