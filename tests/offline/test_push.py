"""Push notifications for offline devices through a Matrix push gateway played by a small
HTTP server inside the test, with a real uvicorn server (the online device's socket; its
presence TTL is long, so what reaches the socket came through a live poke) and a real Celery
worker and beat (the pipeline and the push sender)."""

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imcore.models import Device
from offline import keys, push, store
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


def with_pushkey(device, pushkey):
    response = device.put("/devices/current/pushkey", {"pushkey": pushkey, "app_id": "org.test"})
    assert response.status_code in (200, 204), response.content
    return device


def tablet_of(member, second_device, pushkey="tablet-key"):
    return with_pushkey(second_device(member, "tablet"), pushkey)


def device_pk(member, device_id: str) -> int:
    return Device.objects.get(user=member.user, device_id=device_id).pk


def push_state(pk: int) -> tuple:
    """A device's push schedule, read at one instant: (due at, kind, last taken at). A push
    scheduled for it shows in the first two until ``push_take`` takes it, which moves the
    third."""
    pipe = store.client().pipeline(transaction=True)
    pipe.zscore(keys.PUSH_DUE, str(pk))
    pipe.hget(keys.PUSH_KIND, str(pk))
    pipe.hget(keys.PUSH_LAST, str(pk))
    return tuple(pipe.execute())


def test_online_device_gets_the_socket_offline_one_a_push_then_catches_up(
    poke_server, make_member, second_device, pushing
):
    """Both devices have a pushkey: the online phone gets the message over its socket and no
    push is even scheduled for it; the offline tablet gets the push, then catches up."""
    gateway = pushing
    alice, bob = make_member("alice"), make_member("bob")
    with_pushkey(alice, "phone-key")
    tablet = tablet_of(alice, second_device)
    since = first_sync(tablet)
    assert tablet.post("/sync/ack", {"version": since}).status_code == 200
    cid = group(bob, alice)
    with ws(poke_server, alice) as phone:
        frames_until(phone, 0)
        wait_until(lambda: store.presence_online([alice.id])[alice.id])
        bob.send(cid, "hello")
        live: list[dict] = []
        while not live:  # frames come as the worker's pokes do: the join, then the message
            live = [
                e
                for f in frames_until(phone, 0, timeout=20)
                for e in f["entries"]
                if e["type"] == "message"
            ]
        assert live[0]["message"]["body"] == "hello"
        push_ = wait_until(lambda: gateway.pushes("tablet-key"), timeout=20)[0]
        # the tablet's push was scheduled by the same flush: one for the phone would be due
        # (or taken) by now
        assert push_state(device_pk(alice, "phone")) == (None, None, None)
    assert gateway.received[0]["path"] == "/_matrix/push/v1/notify"
    assert push_["counts"]["unread"] == 1 and push_["prio"] == "high" and push_["event_id"]
    assert push_["devices"][0]["app_id"] == "org.test"
    assert not gateway.pushes("phone-key")  # the online device got no push
    # the tablet comes back: the socket delivers what it missed, in order, exactly once
    entries, latest = pull_all(alice, since)
    with ws(poke_server, tablet) as sock:
        got = [e["version"] for f in frames_until(sock, latest) for e in f["entries"]]
    assert got == [e["version"] for e in entries] == list(range(since + 1, latest + 1))


def test_a_badge_change_schedules_pushes_only_for_offline_devices(
    poke_server, make_member, second_device, settings
):
    """``push_badge_changed`` skips a device with a live socket and schedules the others."""
    settings.PUSH_INTERVAL_S = INTERVAL
    alice = with_pushkey(make_member("alice"), "phone-key")
    tablet_of(alice, second_device)
    with ws(poke_server, alice):
        wait_until(lambda: store.presence_online([alice.id])[alice.id])
        assert push.push_badge_changed(user_ids=[alice.id], alert=True) == 1
    assert push_state(device_pk(alice, "phone")) == (None, None, None)
    assert push_state(device_pk(alice, "tablet"))[1] == "alert"


def test_a_device_online_when_its_push_falls_due_gets_none(
    poke_server, make_member, second_device, gateway, settings
):
    """A push scheduled while the phone was offline is not sent once it is online: the
    socket brings everything."""
    settings.PUSH_INTERVAL_S = INTERVAL
    settings.PUSH_BACKEND = "matrix"
    settings.PUSH_GATEWAY_URL = gateway.url
    alice = with_pushkey(make_member("alice"), "phone-key")
    tablet_of(alice, second_device)
    assert push.push_badge_changed(user_ids=[alice.id], alert=True) == 2  # both offline
    with ws(poke_server, alice):
        wait_until(lambda: store.presence_online([alice.id])[alice.id])
        assert push.push_send_due() == 1
    assert [p["prio"] for p in gateway.pushes("tablet-key")] == ["high"]
    assert gateway.pushes("phone-key") == []
    assert push_state(device_pk(alice, "phone"))[:2] == (None, None)  # taken, not sent


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
    assert pushes[-1]["counts"]["unread"] == 15


def test_muted_conversations_do_not_push_and_a_read_sends_a_silent_update(
    make_member, second_device, pushing
):
    """A message in a conversation alice muted schedules no push for her (carol, who did not
    mute it, gets hers: the message was processed); a read sends a silent badge update."""
    gateway = pushing
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    tablet_of(alice, second_device)
    tablet_of(carol, second_device, pushkey="carol-key")
    muted = group(bob, alice, carol, title="muted")
    loud = group(bob, alice, title="loud")
    assert alice.post(f"/conversations/{muted}/mute", {"muted": True}).status_code == 200
    wait_until(lambda: gateway.pushes("tablet-key"), timeout=10)  # the mute's silent update
    alice_tablet = device_pk(alice, "tablet")
    before = push_state(alice_tablet)
    assert before[:2] == (None, None) and before[2]  # taken; nothing else due
    gateway.received.clear()
    bob.send(muted, "quiet")
    carols = wait_until(lambda: gateway.pushes("carol-key"), timeout=20, message="send unseen")
    assert carols[0]["prio"] == "high" and carols[0]["counts"]["unread"] == 1
    # the flush that scheduled carol's push would have scheduled alice's alongside: it would
    # be due now, or taken (which moves its last-taken time)
    assert push_state(alice_tablet) == before
    assert gateway.pushes("tablet-key") == []
    bob.send(loud, "loud")
    wait_until(lambda: [p for p in gateway.pushes("tablet-key") if p["prio"] == "high"])
    gateway.received.clear()
    assert alice.post(f"/conversations/{loud}/read", {"seq": 1}).status_code == 200  # phone
    silent = wait_until(lambda: gateway.pushes("tablet-key"), timeout=INTERVAL + 10)[0]
    assert silent["prio"] == "low" and "event_id" not in silent
    assert silent["counts"]["unread"] == 0


def test_a_rejected_pushkey_is_forgotten(make_member, second_device, pushing):
    gateway = pushing
    gateway.reject.add("tablet-key")
    alice, bob = make_member("alice"), make_member("bob")
    tablet_of(alice, second_device)
    cid = group(bob, alice)
    bob.send(cid, "to a dead key")
    wait_until(lambda: gateway.pushes("tablet-key"), timeout=20)
    wait_until(lambda: Device.objects.get(user=alice.user, device_id="tablet").pushkey == "")
