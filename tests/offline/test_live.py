"""Live sync over ``/ws/v1/sync`` against a real uvicorn server process: the offline package
on connect, live entries, no gap and no repeat at the seam between them, acks over the
socket, presence with a TTL, and refused tokens and frames."""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from counters.pipeline import counters_drain
from imcore.models import Device
from offline import keys, services, store
from tests.conftest import ROOT, celery_env, wait_until
from tests.offline.conftest import first_sync, pull_all
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)

TTL = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    """uvicorn serving imcore.asgi on the test database and Redis, with a short presence TTL
    and small frames (so a package takes many frames)."""
    port = free_port()
    with django_db_blocker.unblock():
        env = celery_env(PRESENCE_TTL_S=TTL, SYNC_WS_FRAME_ENTRIES=50)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "imcore.asgi:application",
            "--port",
            str(port),
            "--ws-ping-interval",
            str(TTL / 3),
            "--ws-ping-timeout",
            str(TTL / 3),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )

    def up():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    wait_until(up, timeout=30, message="uvicorn did not start")
    yield f"ws://127.0.0.1:{port}/ws/v1/sync"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ws(url, member, **kw):
    kw.setdefault("max_queue", None)  # read everything: a full queue would stop answering pings
    return connect(url, additional_headers={"Authorization": f"Bearer {member.token}"}, **kw)


def frames_until(sock, version: int, timeout: float = 15) -> list[dict]:
    """Sync frames until one reaches ``version``."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = sock.recv(timeout=max(deadline - time.monotonic(), 0.01))
        except TimeoutError:
            got = versions(out)
            pytest.fail(
                f"waited for version {version}; got {len(got)} entries up to "
                f"{got[-1] if got else None}, frames {[f['latest_version'] for f in out]}"
            )
        frame = json.loads(raw)
        if frame["type"] == "sync":
            out.append(frame)
            if (
                frame["latest_version"] >= version
                and not frame["has_more"]
                and (frame["gap"] or frame["entries"][-1]["version"] >= version)
            ):
                return out


def versions(frames) -> list[int]:
    return [e["version"] for f in frames for e in f["entries"]]


def ack(member, version: int) -> None:
    assert member.post("/sync/ack", {"version": version}).status_code == 200


def test_connect_gets_the_package_then_live_entries(server, make_member, second_device):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    since = first_sync(laptop)
    ack(laptop, since)
    cid = group(bob, alice)
    for i in range(120):
        bob.send(cid, f"m{i}")
    counters_drain()
    _, latest = pull_all(alice, since)
    with ws(server, laptop) as sock:
        package = frames_until(sock, latest)
        assert versions(package) == list(range(since + 1, latest + 1))
        assert len(package) == 3  # frames of 50: join + 120 messages
        assert store.presence_online([alice.id])[alice.id] == {
            Device.objects.get(user=alice.user, device_id="laptop").pk
        }
        bob.send(cid, "live")
        counters_drain()
        live = frames_until(sock, latest + 1)
        assert [e["message"]["body"] for e in live[0]["entries"]] == ["live"]
        sock.send(json.dumps({"type": "ack", "version": latest + 1}))
        assert json.loads(sock.recv(timeout=5)) == {"type": "acked", "acked_version": latest + 1}
    wait_until(lambda: not store.presence_online([alice.id])[alice.id])


def test_no_gap_and_no_repeat_at_the_seam(server, make_member, second_device):
    """Entries written while the package is being sent: every version arrives once, in
    order."""
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    since = first_sync(laptop)
    ack(laptop, since)
    cid = group(bob, alice)
    for i in range(400):
        bob.send(cid, f"m{i}")
    counters_drain()
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set() and n < 200:
            services.offline_record_read(user_id=alice.id, conversation_id=cid, seq=n % 400 + 1)
            n += 1

    # reads at growing seqs each record a new entry
    t = threading.Thread(target=writer)
    with ws(server, laptop) as sock:
        t.start()
        t.join()
        stop.set()
        _, latest = pull_all(alice, since)
        got = versions(frames_until(sock, latest))
    assert got == list(range(since + 1, latest + 1))


def test_a_quiet_client_stays_online(server, make_member):
    alice = make_member("alice")
    with ws(server, alice):
        time.sleep(TTL * 2)  # no frames from the client; it answers the server's pings
        assert store.presence_online([alice.id])[alice.id]


def test_a_connection_dropped_without_a_close_frame_goes_offline_within_the_ttl(
    server, make_member
):
    """A client that vanished (it answers nothing, sends no close frame; its TCP stays
    open) is offline within the TTL."""
    alice = make_member("alice")
    host, port = server.split("/")[2].split(":")
    raw = socket.create_connection((host, int(port)))
    raw.sendall(
        (
            "GET /ws/v1/sync HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {alice.token}\r\n\r\n"
        ).encode()
    )
    try:
        assert b"101" in raw.recv(1024)
        wait_until(lambda: store.presence_online([alice.id])[alice.id])
        went_online = time.monotonic()
        wait_until(lambda: not store.presence_online([alice.id])[alice.id], timeout=TTL + 5)
        assert time.monotonic() - went_online < TTL + 1
    finally:
        raw.close()


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[]",
        '{"type": "nope"}',
        '{"type": "ack"}',
        '{"type": "ack", "version": -1}',
        '{"type": "ack", "version": "5"}',
        '{"type": "ack", "version": 99999999}',
        '{"type": "ping", "extra": 1}',
    ],
)
def test_a_bad_frame_closes_with_4400_and_changes_nothing(server, make_member, frame):
    alice = make_member("alice")
    with ws(server, alice) as sock:
        frames_until(sock, 0)
        before = store.client().hgetall(keys.ACKS_PENDING)
        sock.send(frame)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                sock.recv(timeout=5)
        assert closed.value.rcvd.code == 4400
    assert store.client().hgetall(keys.ACKS_PENDING) == before


@pytest.mark.parametrize("token", [None, "", "garbage", "x" * 43])
def test_a_bad_token_closes_with_4401(server, make_member, token):
    alice = make_member("alice")
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with connect(server, additional_headers=headers) as sock:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                sock.recv(timeout=5)
        assert closed.value.rcvd.code == 4401
    assert not store.presence_online([alice.id])[alice.id]
