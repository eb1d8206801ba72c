"""Live sync over ``/ws/v1/sync`` against a real uvicorn server process: the offline package
on connect, live entries, no gap and no repeat at the seam between them, acks over the
socket, presence with a TTL, and refused tokens and frames.

Delivery tests run on ``poke_server``, whose presence TTL is so long that a connection's
periodic catch-up never runs: a live entry reaches the socket through the writer's poke or not
at all. Presence tests run on ``server`` (a TTL of ``TTL`` seconds)."""

import json
import socket
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from delivery.pipeline import delivery_drain
from imcore.models import Device
from offline import keys, services, store
from tests.conftest import wait_until
from tests.offline.conftest import TTL, first_sync, pull_all
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)

# A poked device gets a live entry within this many seconds of the write (measured on a
# loaded 2-core box: about 0.02-0.13 s). The periodic catch-up that could also bring it runs
# every LIVE_TTL / 3 seconds on ``poke_server``.
POKE_DEADLINE_S = 0.5


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


def test_connect_gets_the_package_then_live_entries(poke_server, make_member, second_device):
    """On connect the device gets its offline package, then each live entry within
    ``POKE_DEADLINE_S`` of its write (the poke: the periodic catch-up is minutes away)."""
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    since = first_sync(laptop)
    ack(laptop, since)
    cid = group(bob, alice)
    for i in range(120):
        bob.send(cid, f"m{i}")
    delivery_drain()
    _, latest = pull_all(alice, since)
    with ws(poke_server, laptop) as sock:
        package = frames_until(sock, latest)
        assert versions(package) == list(range(since + 1, latest + 1))
        assert len(package) == 3  # frames of 50: join + 120 messages
        assert store.presence_online([alice.id])[alice.id] == {
            Device.objects.get(user=alice.user, device_id="laptop").pk
        }
        bob.send(cid, "live")
        delivery_drain()  # the aggregator, in this process, writes the entry and pokes
        live = frames_until(sock, latest + 1, timeout=POKE_DEADLINE_S)
        assert [e["message"]["body"] for e in live[0]["entries"]] == ["live"]
        sock.send(json.dumps({"type": "ack", "version": latest + 1}))
        assert json.loads(sock.recv(timeout=5)) == {"type": "acked", "acked_version": latest + 1}
    wait_until(lambda: not store.presence_online([alice.id])[alice.id])


def test_no_gap_and_no_repeat_at_the_seam(poke_server, make_member, second_device):
    """Entries written while the package is being read and sent: every version arrives once,
    in order, and the writer is shown to have written across the package."""
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    since = first_sync(laptop)
    ack(laptop, since)
    cid = group(bob, alice)
    for i in range(400):
        bob.send(cid, f"m{i}")
    delivery_drain()
    package_received = threading.Event()
    started = threading.Event()

    def writer():
        # Each read at a higher seq records a new "read" entry (the store does not check the
        # seq against the messages). Write until the package is in, then some more.
        seq = 0
        while not package_received.is_set() and seq < 20_000:
            seq += 1
            services.offline_record_read(user_id=alice.id, conversation_id=cid, seq=seq)
            if seq == 5:
                started.set()
        for _ in range(20):
            seq += 1
            services.offline_record_read(user_id=alice.id, conversation_id=cid, seq=seq)

    t = threading.Thread(target=writer)
    t.start()
    try:
        started.wait(10)
        with ws(poke_server, laptop) as sock:
            package: list[dict] = []  # the frames of the first catch-up: up to has_more false
            while not package or package[-1]["has_more"]:
                frame = json.loads(sock.recv(timeout=15))
                if frame["type"] == "sync":
                    package.append(frame)
            package_received.set()
            t.join()
            _, latest = pull_all(alice, since)
            live = frames_until(sock, latest)
    finally:
        package_received.set()
        t.join()
    got = versions(package + live)
    assert got == list(range(since + 1, latest + 1))
    seam = versions(package)[-1]
    reads = [e["version"] for f in package + live for e in f["entries"] if e["type"] == "read"]
    # the writer wrote while the package was being read (each frame's latest_version is the
    # user's version when that page was read) and went on past it
    assert package[0]["latest_version"] < package[-1]["latest_version"], [
        f["latest_version"] for f in package
    ]
    assert reads[0] < seam < reads[-1], (reads[0], seam, reads[-1])


def test_a_quiet_client_stays_online(server, make_member):
    """A connected client that sends nothing stays online past the TTL."""
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


def test_devices_lists_mine_with_online_last_seen_acked_and_push(
    server, make_member, second_device
):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    assert laptop.put("/devices/current/pushkey", {"pushkey": "k1"}).status_code == 204
    since = first_sync(laptop)
    assert laptop.post("/sync/ack", {"version": since}).status_code == 200
    with ws(server, alice):
        wait_until(lambda: store.presence_online([alice.id])[alice.id])
        devices = {d["device_id"]: d for d in alice.get("/devices").json()["devices"]}
    assert set(devices) == {"phone", "laptop"}  # bob's phone is not listed
    assert devices["phone"]["online"] is True and devices["phone"]["current"] is True
    assert devices["laptop"]["online"] is False and devices["laptop"]["push"] is True
    assert devices["laptop"]["acked_version"] == since
    assert devices["laptop"]["last_seen_at"] is not None
    assert devices["phone"]["push"] is False
    assert laptop.delete("/devices/current/pushkey").status_code == 204
    assert not Device.objects.get(user=alice.user, device_id="laptop").pushkey
    assert bob.get("/devices").json()["devices"][0]["device_id"] == "phone"
    assert alice.get("/devices", token="nope").status_code == 401


def test_a_socket_gets_only_its_own_users_entries(poke_server, make_member):
    """Another user's token opens that user's stream, never this one's."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    cid = alice.post("/conversations", {"kind": "direct", "members": [carol.id]}).json()["id"]
    with ws(poke_server, bob) as bob_sock, ws(poke_server, carol) as carol_sock:
        frames_until(bob_sock, 0)
        frames_until(carol_sock, 0)
        alice.send(cid, "for carol only")
        delivery_drain()
        bodies = [
            e["message"]["body"]
            for f in frames_until(carol_sock, 0, timeout=POKE_DEADLINE_S)
            for e in f["entries"]
        ]
        assert bodies == ["for carol only"]
        with pytest.raises(TimeoutError):
            bob_sock.recv(timeout=1.5)
