"""The API's 503 answers, each provoked for real (no mocks): counters busy (a held lock, WATCH
losing to a concurrent writer), the sync store unable to hand out versions, Redis refusing
connections during a mute, join or leave. Each answers the one JSON error shape, keeps what
PostgreSQL committed, and the client's retry of the same request repairs Redis. And the
enqueue's broker-down fallback: a send answers 201 with its event kept for the Timer."""

import json
import subprocess
import sys
import textwrap
from unittest.mock import ANY

import pytest

from counters import keys as counter_keys
from counters.redis import get_redis
from counters.selectors import counters_get
from delivery import keys as delivery_keys
from delivery.pipeline import (
    delivery_drain,
    delivery_request_aggregate,
    shard_lengths,
    shard_of,
)
from imcore.models import Membership
from offline import keys as sync_keys
from offline import store
from tests.conftest import ROOT, celery_env, running_worker, wait_until
from tests.helpers import counter_mismatches
from tests.offline.test_seqsvr import STEP, pinned_bound  # noqa: F401 (a fixture)
from tests.offline.test_sync import group

pytestmark = pytest.mark.django_db(transaction=True)

DEAD = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused


def assert_503(response, code: str) -> None:
    assert response.status_code == 503, response.content
    body = response.json()
    assert body["error"] == code and body["message"], body
    assert "Traceback" not in response.content.decode()


def entries(user_id: int, conversation_id: int, typ: str) -> list[store.Entry]:
    """The user's offline-store entries of one type for one conversation."""
    log = store.client().zrange(sync_keys.log(user_id), 0, -1)
    return [
        e
        for e in map(store.Entry.parse, log)
        if e.type == typ and e.conversation_id == conversation_id
    ]


@pytest.fixture
def team(make_member):
    """alice's group with bob, three messages bob has not read; returns (alice, bob, id)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = group(alice, bob)
    for i in range(3):
        alice.send(gid, f"m{i}")
    delivery_drain()
    assert bob.unread() == {"badge": 3, "conversations": {str(gid): 3}, "mentions": {}}
    return alice, bob, gid


def read_pointer(member, gid: int) -> int:
    return Membership.objects.get(user=member.user, conversation_id=gid).last_read_seq


# ---- counters busy -------------------------------------------------------------------------


def test_a_lock_held_past_the_wait_answers_counters_busy_and_the_retry_applies(team, settings):
    """``lock`` strategy: while another holder keeps bob's counter lock longer than
    ``COUNTERS_LOCK_WAIT_MS``, his mark-read answers 503 ``counters_busy`` with the read
    pointer stored; once the lock is free the same request answers the right counts."""
    alice, bob, gid = team
    settings.COUNTERS_STRATEGY = "lock"
    settings.COUNTERS_LOCK_WAIT_MS = 50
    held = get_redis().lock(counter_keys.counters_lock(bob.id), timeout=30)
    assert held.acquire(blocking=False)
    try:
        assert_503(bob.post(f"/conversations/{gid}/read", {"seq": 2}), "counters_busy")
        assert read_pointer(bob, gid) == 2
        assert counters_get(user_id=bob.id).badge == 3  # Redis untouched
    finally:
        held.release()
    assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).json() == {
        "unread": 1,
        "badge": 1,
        "badge_version": ANY,
    }
    assert counter_mismatches([alice.id, bob.id]) == []


TOUCHER = textwrap.dedent(
    """
    import sys, redis
    client = redis.Redis.from_url(sys.argv[1])
    key = sys.argv[2]
    client.set(key + ":toucher", 1)
    while True:
        pipe = client.pipeline(transaction=False)
        for _ in range(50):
            pipe.hset(key, "ready", 1)  # the same value: a write WATCH sees, no change
        pipe.execute()
    """
)


def test_watch_retries_used_up_under_contention_answer_counters_busy(team, settings):
    """``watch`` strategy with one attempt: while another process keeps writing bob's counter
    hash, his mark-read loses the WATCH race and answers 503 ``counters_busy`` with the read
    pointer stored; once the writer stops, the same request answers the right counts."""
    alice, bob, gid = team
    settings.COUNTERS_STRATEGY = "watch"
    settings.COUNTERS_WATCH_MAX_RETRIES = 1
    key = counter_keys.counters(bob.id)
    toucher = subprocess.Popen([sys.executable, "-c", TOUCHER, settings.REDIS_URL, key])
    try:
        wait_until(lambda: get_redis().exists(key + ":toucher"), message="no toucher")
        for _ in range(50):  # each try loses unless the toucher was off the CPU throughout
            response = bob.post(f"/conversations/{gid}/read", {"seq": 2})
            if response.status_code != 200:
                break
        assert_503(response, "counters_busy")
        assert read_pointer(bob, gid) == 2
    finally:
        toucher.kill()
        toucher.wait()
        get_redis().delete(key + ":toucher")
    assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).json() == {
        "unread": 1,
        "badge": 1,
        "badge_version": ANY,
    }
    assert counter_mismatches([alice.id, bob.id]) == []


# ---- sync unavailable ----------------------------------------------------------------------


def test_sync_unavailable_answers_503_and_the_retry_records_the_read_once(
    make_member,
    settings,
    pinned_bound,  # noqa: F811
):
    """When bob's version bound cannot be raised (PostgreSQL keeps it), his mark-read answers
    503 ``sync_unavailable`` with the read pointer and counters applied; once it can, the
    retry answers 200 and his devices get one read entry."""
    settings.OFFLINE_VERSION_STEP = STEP
    alice, bob = make_member("alice"), make_member("bob")
    gid = group(alice, bob)
    for i in range(STEP - 1):  # bob's versions reach the bound
        alice.send(gid, f"m{i}")
    delivery_drain()
    pinned_bound(bob.id)
    assert_503(bob.post(f"/conversations/{gid}/read", {"seq": 2}), "sync_unavailable")
    assert read_pointer(bob, gid) == 2
    assert entries(bob.id, gid, "r") == []
    pinned_bound.unpin()
    answer = bob.post(f"/conversations/{gid}/read", {"seq": 2})
    assert answer.json() == {"unread": STEP - 3, "badge": STEP - 3, "badge_version": ANY}
    assert [e.arg for e in entries(bob.id, gid, "r")] == ["2"]
    assert counter_mismatches([alice.id, bob.id]) == []


# ---- Redis down during mute, join and leave -------------------------------------------------


def test_mute_with_redis_down_is_kept_and_the_retry_applies_it(team, settings):
    """A mute whose Redis update fails answers 503 with the mute stored; the retry moves the
    count out of the badge and records one mute entry."""
    alice, bob, gid = team
    good, settings.REDIS_URL = settings.REDIS_URL, DEAD
    assert_503(bob.post(f"/conversations/{gid}/mute", {"muted": True}), "counters_unavailable")
    settings.REDIS_URL = good
    assert Membership.objects.get(user=bob.user, conversation_id=gid).muted is True
    assert bob.unread()["badge"] == 3  # Redis missed it
    answer = bob.post(f"/conversations/{gid}/mute", {"muted": True})
    assert answer.json() == {
        "conversation_id": gid,
        "muted": True,
        "unread": 3,
        "badge": 0,
        "badge_version": ANY,
    }
    assert [e.arg for e in entries(bob.id, gid, "u")] == ["1"]
    assert counter_mismatches([alice.id, bob.id]) == []


def test_join_with_redis_down_is_kept_and_the_retry_applies_it(team, make_member, settings):
    """A join whose Redis update fails answers 503 with the membership stored; the retry
    answers 200 (nobody new), carol gets one join entry, and she counts only what comes
    after her join."""
    alice, bob, gid = team
    carol = make_member("carol")
    group(carol, bob, title="carol's")  # carol's sync store is loaded already
    good, settings.REDIS_URL = settings.REDIS_URL, DEAD
    response = alice.post(f"/conversations/{gid}/members", {"user_ids": [carol.id]})
    assert_503(response, "counters_unavailable")
    settings.REDIS_URL = good
    assert Membership.objects.filter(user=carol.user, conversation_id=gid).exists()
    retried = alice.post(f"/conversations/{gid}/members", {"user_ids": [carol.id]})
    assert retried.status_code == 200 and retried.json()["added"] == []
    assert len(entries(carol.id, gid, "j")) == 1
    assert carol.unread()["conversations"][str(gid)] == 0
    alice.send(gid, "after the join")
    delivery_drain()
    assert carol.unread()["conversations"][str(gid)] == 1
    assert [e.arg for e in entries(carol.id, gid, "m")] == ["4"]
    assert counter_mismatches([alice.id, bob.id, carol.id]) == []


def test_leave_with_redis_down_is_kept_and_the_retry_applies_it(team, settings):
    """A leave whose Redis update fails answers 503 with the leave stored; the retry answers
    204, the conversation leaves bob's counts and badge, and he gets one leave entry."""
    alice, bob, gid = team
    good, settings.REDIS_URL = settings.REDIS_URL, DEAD
    assert_503(bob.delete(f"/conversations/{gid}/members/{bob.id}"), "counters_unavailable")
    settings.REDIS_URL = good
    assert Membership.objects.get(user=bob.user, conversation_id=gid).left_at is not None
    assert bob.delete(f"/conversations/{gid}/members/{bob.id}").status_code == 204
    assert bob.unread() == {"badge": 0, "conversations": {}, "mentions": {}}
    assert len(entries(bob.id, gid, "l")) == 1
    assert counter_mismatches([alice.id, bob.id]) == []


# ---- the enqueue when the broker is down ----------------------------------------------------

SEND_WITH_BROKER_DOWN = textwrap.dedent(
    """
    import json, sys
    import django
    django.setup()
    from django.test import Client
    response = Client().post(
        f"/api/v1/conversations/{sys.argv[1]}/messages",
        json.dumps({"body": "broker down", "client_msg_id": "broker-down"}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {sys.argv[2]}"},
    )
    print(json.dumps({"status": response.status_code}))
    """
)


@pytest.mark.worker
def test_a_send_with_the_broker_down_keeps_its_event_for_the_timer(team, settings):
    """With the broker refusing connections, a send that crosses the Flusher's threshold
    answers 201: the Flusher cannot be sent, the event waits in its shard, and the shard's
    flag is cleared, so the Timer's next request goes through at once and a worker counts the
    message."""
    alice, bob, gid = team
    env = celery_env(
        CELERY_BROKER_URL="redis://127.0.0.1:1/15",
        COUNTERS_FLUSH_THRESHOLD=1,
        LOG_LEVEL="WARNING",
    )
    sender = subprocess.Popen(
        [sys.executable, "-c", SEND_WITH_BROKER_DOWN, str(gid), alice.token],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with running_worker(beat=False):  # no Timer of its own: the test ticks it below
        out, err = sender.communicate(timeout=120)
        assert json.loads(out.splitlines()[-1]) == {"status": 201}, err
        assert "could not send the Flusher" in err
        assert sum(shard_lengths()) == 1  # the event waits in its shard
        assert bob.unread()["badge"] == 3
        shard = shard_of(gid)
        assert not get_redis().exists(delivery_keys.shard_flush_flag(shard))
        # The Timer's request (the worker has no beat) is not held back by a stale flag.
        assert delivery_request_aggregate(shard=shard, trigger="timer")
        wait_until(lambda: bob.unread()["badge"] == 4, message="the aggregate did not run")
    assert counter_mismatches([alice.id, bob.id]) == []
