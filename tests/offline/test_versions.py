"""Versions only grow and never repeat: under concurrent writers, after Redis is wiped and
the app restarts, and after Redis restarts from an older snapshot of itself (the case the
run_id check exists for: without it this test hands out versions twice)."""

import shutil
import subprocess
import tempfile
import time

import pytest
import redis

from delivery.pipeline import delivery_drain, shard_lengths
from imcore import services as im
from imcore.models import Conversation, User
from offline import keys, store
from offline.models import VersionBound
from tests.conftest import running_worker, wait_until
from tests.counters.test_concurrency import run_processes
from tests.offline.conftest import first_sync, pull, pull_all
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)


def log_versions(user_id: int) -> list[int]:
    return [int(s) for _, s in store.client().zrange(keys.log(user_id), 0, -1, withscores=True)]


def test_versions_grow_above_everything_handed_out_after_a_wipe_and_restart(
    make_member, second_device
):
    alice, bob = make_member("alice"), make_member("bob")
    laptop = second_device(alice)
    team = group(bob, alice)
    for i in range(5):
        bob.send(team, f"before{i}")
    delivery_drain()
    assert alice.post(f"/conversations/{team}/read", {"seq": 3}).status_code == 200
    synced = first_sync(laptop)
    handed_out = max(log_versions(alice.id))
    assert synced == handed_out

    store.client().flushdb()  # Redis loses everything
    # the app restarts: a fresh worker (and beat) writes what comes next
    with running_worker(beat=True):
        # The first message after the wipe may be committed before the worker reloads alice:
        # then the reload counts it as known (her devices' snapshot has it), so send two.
        bob.send(team, "after the wipe")
        wait_until(lambda: sum(shard_lengths()) == 0, message="the worker applied nothing")
        bob.send(team, "after the reload")
        wait_until(lambda: log_versions(alice.id), message="the worker recorded nothing")
    after = log_versions(alice.id)
    assert min(after) > handed_out
    # the device that synced before the wipe gets the snapshot, then continues
    page = pull(laptop, synced)
    assert page["gap"] is True and page["latest_version"] > handed_out
    team_state = next(c for c in page["snapshot"]["conversations"] if c["conversation_id"] == team)
    assert team_state["last_seq"] == 7 and team_state["read_seq"] == 3
    bob.send(team, "later")
    delivery_drain()
    entries, _ = pull_all(laptop, page["latest_version"])
    assert [e["message"]["body"] for e in entries if e["type"] == "message"] == ["later"]
    assert VersionBound.objects.get(user=alice.user).bound >= max(log_versions(alice.id))


@pytest.fixture
def private_redis(settings):
    """A redis-server of the test's own with RDB snapshots in a temp dir; ``restart()`` stops it
    without saving and starts it again from the last snapshot taken."""
    workdir = tempfile.mkdtemp(prefix="imcore-redis-")
    port = 6391
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
           "--save", "", "--appendonly", "no"]  # fmt: skip
    procs = []

    def start():
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        probe = redis.Redis(port=port)
        wait_until(lambda: _pings(probe), timeout=10, message="private redis did not start")

    def restart():
        store.client().shutdown(nosave=True)
        procs[-1].wait(10)
        start()

    start()
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    settings.REDIS_CLUSTER_NODES = []  # a single Redis's snapshots, also in the cluster pass
    yield restart
    for proc in procs:
        proc.kill()
        proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_versions_never_repeat_after_redis_restarts_from_an_older_snapshot(
    make_member, private_redis
):
    alice, bob = make_member("alice"), make_member("bob")
    team = group(bob, alice)
    for i in range(3):
        bob.send(team, f"saved{i}")
    delivery_drain()
    store.client().save()  # the snapshot Redis will come back from
    for i in range(4):
        bob.send(team, f"lost{i}")
    delivery_drain()
    handed_out = max(log_versions(alice.id))

    private_redis()  # Redis restarts with the older snapshot: its cur is behind
    assert max(log_versions(alice.id)) < handed_out
    bob.send(team, "after the restart")
    delivery_drain()
    bob.send(team, "and one more")
    delivery_drain()
    after = log_versions(alice.id)
    assert after and min(after) > handed_out
    page = pull(alice, handed_out)  # a device that had everything before the restart
    assert page["gap"] is True and page["latest_version"] > handed_out


# ---- concurrent writers on one user ---------------------------------------------------------


SENDERS, READERS, PER_SENDER = 4, 2, 40


def _send(sender_id: int, conversation_id: int, n: int) -> int:
    conversation = Conversation.objects.get(pk=conversation_id)
    sender = User.objects.get(pk=sender_id)
    for i in range(n):
        im.message_send(
            sender=sender, conversation=conversation, body=f"{i}", client_msg_id=f"{sender_id}-{i}"
        )
    return n


def _read_while_sending(user_id: int, conversation_ids: list[int], total: int) -> int:
    """Mark every conversation read up to its last message, over and over, until every
    message is sent; returns how many reads were made while messages were still coming."""
    from imcore.models import Membership

    during = 0
    while True:
        tops = dict(
            Conversation.objects.filter(pk__in=conversation_ids).values_list("pk", "last_seq")
        )
        sending = sum(tops.values()) < total
        for cid in conversation_ids:
            m = Membership.objects.get(user_id=user_id, conversation_id=cid)
            if tops[cid] > m.last_read_seq:
                im.conversation_mark_read(membership=m, seq=tops[cid])
                during += sending
        if not sending:
            return during
        time.sleep(0.005)


def _observe(token: str, since: int, messages: int, timeout: float = 90) -> list[int]:
    """A device pulling as the entries are written: each page must continue exactly where the
    last one stopped. A version handed out below one already seen would be a hole this device
    skips for good. Returns the versions seen, in order."""
    from django.test import Client

    client, seen, got_messages = Client(), [], 0
    deadline = time.monotonic() + timeout
    while got_messages < messages and time.monotonic() < deadline:
        page = client.get(
            "/api/v1/sync",
            {"since": since, "limit": 50},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        assert not page["gap"], page
        versions = [e["version"] for e in page["entries"]]
        assert versions == list(range(since + 1, since + 1 + len(versions))), (since, versions)
        seen += versions
        got_messages += sum(e["type"] == "message" for e in page["entries"])
        since = versions[-1] if versions else since
        if not page["has_more"]:
            time.sleep(0.01)
    return seen


def _client(seed: int, conversation_ids, sender_ids, user_id: int, token: str, since: int):
    """Process ``seed``: a sender (one per group), a reader of all groups, or the observer."""
    total = SENDERS * PER_SENDER
    if seed < SENDERS:
        return _send(sender_ids[seed], conversation_ids[seed], PER_SENDER)
    if seed < SENDERS + READERS:
        return _read_while_sending(user_id, conversation_ids, total)
    return _observe(token, since, total)


def test_versions_strictly_increase_under_concurrent_writers(make_member):
    """Four senders in four groups (four queue shards, so aggregators on two workers write the
    same user's log at once) while the user marks reads from two more processes at the same
    time, and a device pulls along: the versions it sees never leave a hole behind it."""
    alice = make_member("alice")
    since = first_sync(alice)
    senders = [make_member(f"s{i}") for i in range(SENDERS)]
    groups = [group(s, alice, title=f"g{i}") for i, s in enumerate(senders)]
    total = SENDERS * PER_SENDER
    with running_worker(beat=True, workers=2):
        *_, reads_during, seen = run_processes(
            _client, SENDERS + READERS + 1, groups, [s.id for s in senders], alice.id,
            alice.token, since,
        )  # fmt: skip
        wait_until(
            lambda: sum(e["type"] == "message" for e in pull_all(alice, since)[0]) == total,
            timeout=60,
            message="not every message reached alice's store",
        )
    entries, latest = pull_all(alice, since)
    versions = [e["version"] for e in entries]
    assert versions == list(range(since + 1, latest + 1))  # every version once, none skipped
    assert seen == versions[: len(seen)]  # what the device saw on the way is what stayed
    assert reads_during > 0, "no read was made while messages were being sent"
    messages = [(e["conversation_id"], e["seq"]) for e in entries if e["type"] == "message"]
    assert sorted(messages) == sorted((cid, s) for cid in groups for s in range(1, PER_SENDER + 1))
    for cid in groups:
        # per conversation, messages arrive in seq order and read markers only move forward
        assert [s for c, s in messages if c == cid] == list(range(1, PER_SENDER + 1))
        reads = [e["seq"] for e in entries if e["type"] == "read" and e["conversation_id"] == cid]
        assert reads == sorted(set(reads)), (cid, reads)
