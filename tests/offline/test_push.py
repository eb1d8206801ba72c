"""Push notifications for offline devices through a Matrix push gateway played by a small
HTTP server inside the test, with a real uvicorn server (the online device's socket) and a
real Celery worker and beat (the pipeline and the push sender)."""

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imcore.models import Device
from tests.conftest import running_worker, wait_until
from tests.offline.conftest import first_sync, pull_all
from tests.offline.test_live import frames_until, ws
from tests.offline.test_sync import group

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

INTERVAL = 2.0


class Gateway:
    """Records every notify it receives; rejects pushkeys listed in ``reject``."""

    def __init__(self):
        self.received: list[dict] = []
        self.reject: set[str] = set()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                gateway.received.append({"path": self.path, "at": time.monotonic(), **body})
                keys = [d["pushkey"] for d in body["notification"]["devices"]]
                answer = json.dumps({"rejected": [k for k in keys if k in gateway.reject]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def pushes(self, pushkey: str) -> list[dict]:
        return [
            r["notification"]
            for r in self.received
            if pushkey in [d["pushkey"] for d in r["notification"]["devices"]]
        ]


@pytest.fixture
def gateway():
    g = Gateway()
    yield g
    g.server.shutdown()


@pytest.fixture
def pushing(gateway):
    with running_worker(
        beat=True,
        PUSH_BACKEND="matrix",
        PUSH_GATEWAY_URL=gateway.url,
        PUSH_INTERVAL_S=INTERVAL,
    ):
        yield gateway


def tablet_of(member, second_device, pushkey="tablet-key"):
    tablet = second_device(member, "tablet")
    response = tablet.put("/devices/current/pushkey", {"pushkey": pushkey, "app_id": "org.test"})
    assert response.status_code in (200, 204), response.content
    return tablet


def test_online_device_gets_the_socket_offline_one_a_push_then_catches_up(
    server, make_member, second_device, pushing
):
    gateway = pushing
    alice, bob = make_member("alice"), make_member("bob")
    tablet = tablet_of(alice, second_device)
    since = first_sync(tablet)
    assert tablet.post("/sync/ack", {"version": since}).status_code == 200
    cid = group(bob, alice)
    with ws(server, alice) as phone:
        frames_until(phone, 0)
        bob.send(cid, "hello")
        live = wait_until(lambda: [
            e for f in frames_until(phone, 0, timeout=5) for e in f["entries"]
            if e["type"] == "message"
        ] or None, timeout=20)  # fmt: skip
        assert live[0]["message"]["body"] == "hello"
        push = wait_until(lambda: gateway.pushes("tablet-key"), timeout=20)[0]
    assert gateway.received[0]["path"] == "/_matrix/push/v1/notify"
    assert push["counts"] == {"unread": 1} and push["prio"] == "high" and push["event_id"]
    assert push["devices"][0]["app_id"] == "org.test"
    assert not gateway.pushes("phone")  # the online device got no push
    # the tablet comes back: the socket delivers what it missed, in order, exactly once
    entries, latest = pull_all(alice, since)
    with ws(server, tablet) as sock:
        got = [e["version"] for f in frames_until(sock, latest) for e in f["entries"]]
    assert got == [e["version"] for e in entries] == list(range(since + 1, latest + 1))


def test_a_storm_is_one_push_per_interval_with_the_newest_badge(
    make_member, second_device, pushing
):
    gateway = pushing
    alice, bob = make_member("alice"), make_member("bob")
    tablet_of(alice, second_device)
    cid = group(bob, alice)
    started = time.monotonic()
    for i in range(15):
        bob.send(cid, f"storm {i}")
        time.sleep(0.1)
    wait_until(lambda: any(p["counts"]["unread"] == 15 for p in gateway.pushes("tablet-key")),
               timeout=20, message="no push carried the final badge")  # fmt: skip
    elapsed = time.monotonic() - started
    pushes = gateway.pushes("tablet-key")
    assert len(pushes) <= 1 + elapsed / INTERVAL + 1, [p["counts"] for p in pushes]
    at = [r["at"] for r in gateway.received]
    assert all(b - a >= INTERVAL * 0.9 for a, b in itertools.pairwise(at)), at
    assert pushes[-1]["counts"] == {"unread": 15}


def test_muted_conversations_do_not_push_and_a_read_sends_a_silent_update(
    make_member, second_device, pushing
):
    gateway = pushing
    alice, bob = make_member("alice"), make_member("bob")
    tablet_of(alice, second_device)
    muted = group(bob, alice, title="muted")
    loud = group(bob, alice, title="loud")
    assert alice.post(f"/conversations/{muted}/mute", {"muted": True}).status_code == 200
    wait_until(lambda: gateway.pushes("tablet-key"), timeout=10)  # the mute's silent update
    gateway.received.clear()
    bob.send(muted, "quiet")
    time.sleep(INTERVAL + 1.5)
    assert [p for p in gateway.pushes("tablet-key") if p["prio"] == "high"] == []
    bob.send(loud, "loud")
    wait_until(lambda: [p for p in gateway.pushes("tablet-key") if p["prio"] == "high"])
    gateway.received.clear()
    assert alice.post(f"/conversations/{loud}/read", {"seq": 1}).status_code == 200  # phone
    silent = wait_until(lambda: gateway.pushes("tablet-key"), timeout=INTERVAL + 10)[0]
    assert silent["prio"] == "low" and "event_id" not in silent
    assert silent["counts"] == {"unread": 0}


def test_a_rejected_pushkey_is_forgotten(make_member, second_device, pushing):
    gateway = pushing
    gateway.reject.add("tablet-key")
    alice, bob = make_member("alice"), make_member("bob")
    tablet_of(alice, second_device)
    cid = group(bob, alice)
    bob.send(cid, "to a dead key")
    wait_until(lambda: gateway.pushes("tablet-key"), timeout=20)
    wait_until(lambda: Device.objects.get(user=alice.user, device_id="tablet").pushkey == "")
