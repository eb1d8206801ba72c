"""Live relay of large groups' messages over ``/ws/v1/sync`` against a real uvicorn process:
a member's socket gets each message as a ``channel`` frame, a non-member's does not, a socket
starts relaying a group its user joins while connected, and catch-up frames carry
``channels``. The server's presence TTL is long (no periodic refresh during a test), so what
reaches a socket came through the relay or the ``sync.channels`` event."""

import contextlib
import json
import time

import pytest

from counters.redis import get_redis
from delivery.services import delivery_convert
from imcore.models import Conversation
from offline import live
from tests.conftest import celery_env
from tests.offline.conftest import LIVE_TTL, run_server
from tests.offline.test_live import ws
from tests.offline.test_sync import group
from tests.offline.test_sync_channels import MIN, large_group

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def channel_server(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        env = celery_env(PRESENCE_TTL_S=LIVE_TTL, LARGE_GROUP_MIN_MEMBERS=MIN)
    with run_server(env=env) as url:
        yield url


@pytest.fixture
def large(settings):
    settings.LARGE_GROUP_MIN_MEMBERS = MIN
    settings.LARGE_GROUP_EXIT_MEMBERS = MIN - 2


def next_frame(sock, kind: str, timeout: float = 5.0) -> dict | None:
    """The next frame of type ``kind`` within ``timeout`` s (None if none came)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = json.loads(sock.recv(timeout=left))
        except TimeoutError:
            return None
        if frame["type"] == kind:
            return frame
    return None


def settle(sock, quiet: float = 0.5) -> list[dict]:
    """Read frames until none comes for ``quiet`` s (the connect's catch-up)."""
    out = []
    while True:
        try:
            out.append(json.loads(sock.recv(timeout=quiet)))
        except TimeoutError:
            return out


def test_a_member_socket_gets_the_message_a_non_member_socket_does_not(
    large, channel_server, make_member
):
    owner, bob, *others = [make_member() for _ in range(MIN)]
    carol = make_member()
    cid = large_group(owner, bob, *others)
    with ws(channel_server, bob) as b, ws(channel_server, carol) as c:
        connected = settle(b)
        listed = [ch for f in connected if f["type"] == "sync" for ch in f.get("channels", [])]
        assert [ch["conversation_id"] for ch in listed] == [cid]  # the connect's catch-up
        settle(c)
        sent = owner.send(cid, "to the large group")
        frame = next_frame(b, "channel")
        assert frame is not None, "the member's socket got no channel frame"
        assert frame["conversation_id"] == cid and frame["last_seq"] == sent["seq"]
        assert frame["message"] == sent  # as the send and the history calls render it
        assert next_frame(c, "channel", timeout=1.0) is None


def test_a_socket_relays_a_group_its_user_joins_while_connected(large, channel_server, make_member):
    owner, *others = [make_member() for _ in range(MIN)]
    dave = make_member()
    cid = large_group(owner, *others)
    with ws(channel_server, dave) as d:
        settle(d)
        response = owner.post(f"/conversations/{cid}/members", {"user_ids": [dave.id]})
        assert response.status_code == 200, response.content
        joined = next_frame(d, "sync")
        assert joined is not None and joined["entries"][-1]["type"] == "join"
        settle(d)  # the sync.channels event follows the join's poke
        owner.send(cid, "welcome")
        frame = next_frame(d, "channel")
        assert frame is not None, "the socket did not start relaying the group it joined"
        assert frame["message"]["body"] == "welcome"
        # And stops when the user leaves.
        response = owner.delete(f"/conversations/{cid}/members/{dave.id}")
        assert response.status_code == 204, response.content
        settle(d)
        owner.send(cid, "gone")
        assert next_frame(d, "channel", timeout=1.0) is None


def test_one_relayed_message_is_one_publish_for_many_sockets(large, channel_server, make_member):
    """The relay layer is Redis pub/sub: relaying a message to 50 connected sockets of one
    server process costs one PUBLISH, and no other Redis command."""
    n = 50
    owner, *others = [make_member() for _ in range(n)]
    cid = large_group(owner, *others)
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(ws(channel_server, m)) for m in others]
        for s in socks:
            settle(s, quiet=0.2)
        client = get_redis()
        live.live_channel_message(conversation_id=cid, seq=0)  # warm the sender's connection
        for s in socks:
            assert next_frame(s, "channel") is not None
        before = client.info("commandstats")
        live.live_channel_message(conversation_id=cid, seq=0)
        for s in socks:
            assert next_frame(s, "channel") is not None
        after = client.info("commandstats")
    delta = {
        k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"]
        for k in after
        if after[k]["calls"] != before.get(k, {"calls": 0})["calls"]
    }
    delta.pop("cmdstat_info", None)
    print(f"Redis commands for one relayed message to {n - 1} sockets: {delta}")
    assert delta == {"cmdstat_publish": 1}, delta


def test_a_socket_relays_a_group_that_converts_while_connected(large, channel_server, make_member):
    """The conversion tells the members' sockets (``offline_channel_members_changed``, per
    chunk after their counters): they relay the group from then on, and stop when it converts
    back."""
    owner, bob, carol = make_member(), make_member(), make_member()
    cid = group(owner, bob, carol)
    assert Conversation.objects.get(pk=cid).mode == Conversation.Mode.AGGREGATE
    with ws(channel_server, bob) as b:
        settle(b)
        assert delivery_convert(conversation_id=cid, force="channel") == "channel"
        settle(b)
        owner.send(cid, "now a channel")
        frame = next_frame(b, "channel")
        assert frame is not None, "the socket did not start relaying the converted group"
        assert frame["message"]["body"] == "now a channel"
        assert delivery_convert(conversation_id=cid, force="aggregate") == "aggregate"
        settle(b)
        owner.send(cid, "back to normal")
        assert next_frame(b, "channel", timeout=1.0) is None
