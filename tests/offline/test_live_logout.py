"""A logout closes the device's WebSocket (4401) against a real uvicorn server process: at
once through the channel layer's ``device.logout`` event, or at the next periodic check if
that event was lost; the user's other sockets stay open, and presence is cleared."""

import contextlib
import json
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from delivery.pipeline import delivery_drain
from imcore.models import Device
from offline import store
from tests.conftest import celery_env, wait_until
from tests.offline.conftest import run_server
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)

CALM_TTL_S = 60.0  # the periodic check runs every 20 s: a close within seconds is the event's


@pytest.fixture(scope="module")
def calm_server(django_db_setup, django_db_blocker):
    """A server whose sockets check their token only every 20 s."""
    with django_db_blocker.unblock():
        env = celery_env(PRESENCE_TTL_S=CALM_TTL_S)
    with run_server(env=env) as url:
        yield url


@contextlib.contextmanager
def ws(url, member):
    """An open socket of the member's device: connected, in its group, online."""
    headers = {"Authorization": f"Bearer {member.token}"}
    with connect(url, additional_headers=headers, max_queue=None) as sock:
        ping(sock)
        yield sock


def ping(sock, timeout: float = 15) -> None:
    """Send a ping and read until its pong (the socket is open and answering)."""
    sock.send(json.dumps({"type": "ping"}))
    deadline = time.monotonic() + timeout
    while json.loads(sock.recv(timeout=max(deadline - time.monotonic(), 0.01)))["type"] != "pong":
        pass


def closed(sock, timeout: float) -> tuple[int, list[dict], float]:
    """Read until the server closes: ``(close code, frames before it, seconds it took)``."""
    started = time.monotonic()
    frames = []
    with pytest.raises(ConnectionClosed) as exc:
        while True:
            frames.append(json.loads(sock.recv(timeout=timeout)))
    return exc.value.rcvd.code, frames, time.monotonic() - started


def pk_of(member, device_id: str) -> int:
    return Device.objects.get(user=member.user, device_id=device_id).pk


def test_logout_closes_the_devices_socket_at_once(calm_server, make_member, second_device):
    """DELETE /devices/{id} from another device closes that device's open socket with 4401
    within seconds (not at the 20 s periodic check), and it drops out of presence."""
    alice = make_member("alice")
    laptop = second_device(alice, "laptop")
    laptop_pk = pk_of(alice, "laptop")
    with ws(calm_server, laptop) as sock:
        assert laptop_pk in store.presence_online([alice.id])[alice.id]
        started = time.monotonic()
        assert alice.delete("/devices/laptop").status_code == 204
        answered = time.monotonic() - started
        code, frames, _ = closed(sock, timeout=15)
        took = time.monotonic() - started
    assert code == 4401
    assert frames[-1] == {"type": "error", "code": 4401, "message": "this device was logged out"}
    assert took < 5, took
    print(f"logout answered in {answered * 1000:.0f} ms, socket closed {took * 1000:.0f} ms")
    wait_until(lambda: laptop_pk not in store.presence_online([alice.id])[alice.id])
    devices = alice.get("/devices").json()["devices"]
    assert [d["device_id"] for d in devices] == ["phone"]


def test_logout_current_closes_its_own_socket(calm_server, make_member, second_device):
    """DELETE /devices/current closes the calling device's socket with 4401."""
    alice = make_member("alice")
    laptop = second_device(alice, "laptop")
    with ws(calm_server, laptop) as sock:
        assert laptop.delete("/devices/current").status_code == 204
        code, _, took = closed(sock, timeout=15)
    assert code == 4401
    assert took < 5, took


def test_the_users_other_sockets_stay_open(calm_server, make_member, second_device):
    """Logging one device out leaves the user's other sockets open and syncing."""
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice, "laptop")
    cid = group(bob, alice)
    delivery_drain()
    with ws(calm_server, alice) as phone_sock, ws(calm_server, laptop) as laptop_sock:
        assert alice.delete("/devices/laptop").status_code == 204
        assert closed(laptop_sock, timeout=15)[0] == 4401
        ping(phone_sock)
        bob.send(cid, "still here")
        delivery_drain()
        deadline = time.monotonic() + 15
        while True:
            frame = json.loads(phone_sock.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            entries = frame.get("entries", [])
            if any(
                e["type"] == "message" and e["message"]["body"] == "still here" for e in entries
            ):
                break


def test_password_change_closes_the_other_sockets_not_the_current_one(
    calm_server, make_member, second_device
):
    """A password change closes every other device's socket with 4401; the socket of the
    device that changed it stays open, and the others' tokens cannot connect again."""
    alice = make_member("alice")
    laptop, tablet = second_device(alice, "laptop"), second_device(alice, "tablet")
    with (
        ws(calm_server, alice) as phone_sock,
        ws(calm_server, laptop) as laptop_sock,
        ws(calm_server, tablet) as tablet_sock,
    ):
        response = alice.post(
            "/users/me/password",
            {"old_password": "pw-for-tests-1", "new_password": "a-new-long-passphrase"},
        )
        assert response.status_code == 204, response.content
        for sock in (laptop_sock, tablet_sock):
            code, _, took = closed(sock, timeout=15)
            assert code == 4401
            assert took < 5, took
        ping(phone_sock)
        headers = {"Authorization": f"Bearer {laptop.token}"}
        with connect(calm_server, additional_headers=headers) as again:
            assert closed(again, timeout=15)[0] == 4401
        phone_pk = pk_of(alice, "phone")
        wait_until(lambda: store.presence_online([alice.id])[alice.id] == {phone_pk})


def test_a_lost_logout_event_closes_the_socket_at_the_next_check(
    server, make_member, second_device
):
    """A device whose row went without the logout event (the event was lost) is closed with
    4401 by its socket's periodic check, within a third of the presence TTL (3 s here)."""
    alice = make_member("alice")
    laptop = second_device(alice, "laptop")
    with ws(server, laptop) as sock:
        Device.objects.filter(user=alice.user, device_id="laptop").delete()  # no event sent
        code, _, took = closed(sock, timeout=15)
    assert code == 4401
    assert took < 3, took
