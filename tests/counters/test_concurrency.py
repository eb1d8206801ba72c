"""Concurrent writers on shared users and conversations: ``lua``, ``watch`` and ``lock`` end
exact, with the badge equal to the sum of unmuted counts; ``naive`` drifts, which shows these
tests can fail."""

import multiprocessing
import random

import pytest
import redis
from django.conf import settings as django_settings
from django.db import connections

from counters.strategies import get_strategy
from counters.transitions import MembershipRow
from delivery.pipeline import shard_lengths
from imcore import services
from imcore.celery import app as celery_app
from imcore.models import Conversation, Membership, User
from tests.conftest import broker_idle, broker_reset, running_worker, wait_until, worker_ping
from tests.helpers import counter_mismatches

SAFE = ["lua", "watch", "lock"]
FORK = multiprocessing.get_context("fork")
USERS = [101, 102, 103]
CONVS = [1, 2]
MUTED = (103, 2)  # user 103 has conversation 2 muted


def _child(target, seed, args, results):
    try:
        results.put((seed, target(seed, *args)))
    except BaseException as exc:  # report it to the parent instead of dying silently
        results.put((seed, exc))
        raise


def close_for_fork() -> None:
    """Close the parent's sessions and its connection pool before a fork: a child must open
    its own (psycopg_pool's threads do not survive a fork, and a shared socket would mix two
    processes' queries). Celery's prefork pool does the same in each child."""
    for conn in connections.all():
        conn.close()
        if hasattr(conn, "close_pool"):
            conn.close_pool()


def run_processes(target, n: int, *args, timeout: float = 120):
    """Run ``target(seed, *args)`` in ``n`` forked processes; return their results."""
    close_for_fork()
    results = FORK.Queue()
    procs = [FORK.Process(target=_child, args=(target, seed, args, results)) for seed in range(n)]
    for proc in procs:
        proc.start()
    out = dict(results.get(timeout=timeout) for _ in procs)
    for proc in procs:
        proc.join(timeout)
    failed = {seed: r for seed, r in out.items() if isinstance(r, BaseException)}
    assert not failed, f"client processes failed: {failed}"
    return [out[seed] for seed in range(n)]


# ---- the store alone: many processes on three users ----------------------------------------


def hammer(seed: int, strategy_name: str, n_ops: int) -> list[tuple[int, int, int]]:
    """Send (count a new seq for every user) or mark read at random; returns the reads."""
    rnd = random.Random(seed)
    strategy = get_strategy(strategy_name)
    client = strategy.client
    reads = []
    for _ in range(n_ops):
        cid = rnd.choice(CONVS)
        if rnd.random() < 0.6:
            seq = client.incr(f"test:seq:{cid}")
            strategy.inc_many([(uid, [(cid, seq)]) for uid in USERS])
        else:
            uid = rnd.choice(USERS)
            top = int(client.get(f"test:seq:{cid}") or 0)
            read = rnd.randint(0, top)
            strategy.read(uid, cid, read, top)
            reads.append((uid, cid, read))
    return reads


def store_drift(strategy_name: str, n_procs: int = 4, n_ops: int = 600) -> list[str]:
    strategy = get_strategy(strategy_name)
    for uid in USERS:
        strategy.load(
            uid,
            [MembershipRow(c, 1, True, (uid, c) == MUTED, read_seq=0, top=0) for c in CONVS],
        )
    results = run_processes(hammer, n_procs, strategy_name, n_ops)
    top = {c: int(strategy.client.get(f"test:seq:{c}") or 0) for c in CONVS}
    read = {(u, c): 0 for u in USERS for c in CONVS}
    for reads in results:
        for uid, cid, seq in reads:
            read[uid, cid] = max(read[uid, cid], seq)
    problems = []
    for uid in USERS:
        fields = strategy.fetch(uid)
        unread = {c: int(fields[f"u:{c}"]) for c in CONVS}
        want = {c: top[c] - read[uid, c] for c in CONVS}
        badge = sum(n for c, n in want.items() if (uid, c) != MUTED)
        if unread != want:
            problems.append(f"user {uid}: unread {unread} != {want}")
        if int(fields["badge"]) != badge:
            problems.append(f"user {uid}: badge {fields['badge']} != {badge}")
    return problems


@pytest.mark.parametrize("strategy_name", SAFE)
def test_store_stays_exact_under_concurrent_writers(strategy_name):
    """Four processes counting and reading the same three users end exact."""
    assert store_drift(strategy_name) == []


def test_naive_store_drifts_under_concurrent_writers(redis_clean):
    """The same load with two plain commands loses updates: the test sees the drift."""
    for _ in range(5):
        redis_clean.flushdb()
        if store_drift("naive"):
            return
    pytest.fail("naive never drifted: the concurrency test could not catch a broken store")


# ---- the whole service: processes sending and reading, a real worker fanning out -----------


def chat(seed: int, user_ids: list[int], conversation_ids: list[int], n_ops: int) -> None:
    """One client process: send, mark read, or mute or unmute, at random, through the
    services."""
    rnd = random.Random(seed)
    users = {u.pk: u for u in User.objects.filter(pk__in=user_ids)}
    try:
        for i in range(n_ops):
            membership = Membership.objects.select_related("conversation").get(
                user_id=rnd.choice(user_ids), conversation_id=rnd.choice(conversation_ids)
            )
            action = rnd.random()
            if action < 0.5:
                services.message_send(
                    sender=users[membership.user_id],
                    conversation=membership.conversation,
                    body="x",
                    client_msg_id=f"p{seed}-{i}-{rnd.random()}",
                )
            elif action < 0.85:
                last = Conversation.objects.get(pk=membership.conversation_id).last_seq
                services.conversation_mark_read(membership=membership, seq=rnd.randint(0, last))
            else:
                services.conversation_mute(membership=membership, muted=not membership.muted)
    finally:
        connections.close_all()


def drained() -> bool:
    """Every increment applied: none held in the pipeline's shards (an event leaves its shard
    after it was applied) and no task anywhere in the broker."""
    return sum(shard_lengths()) == 0 and broker_idle()


def service_drift(user_ids, conversation_ids, n_procs=3, n_ops=80) -> list[str]:
    run_processes(chat, n_procs, user_ids, conversation_ids, n_ops)
    wait_until(drained, timeout=60, message="the worker did not drain the queue")
    return counter_mismatches(user_ids)


def setup_chat(make_member):
    members = [make_member() for _ in range(4)]
    ids = [m.id for m in members]
    convs = []
    for title in ("one", "two"):
        conv, _ = services.conversation_create(
            creator=members[0].user, kind="group", member_ids=ids, title=title
        )
        convs.append(conv.pk)
    services.conversation_mute(
        membership=Membership.objects.get(user_id=ids[3], conversation_id=convs[1]), muted=True
    )
    return ids, convs


@pytest.mark.worker
@pytest.mark.parametrize("write_path", ["fanout", "pipeline"])
@pytest.mark.parametrize("strategy_name", SAFE)
def test_service_counts_exact_with_concurrent_clients_and_worker(
    strategy_name, write_path, transactional_db, make_member, settings
):
    """Three client processes send, mark read and mute on two shared groups while real
    workers count the messages (a task per message, or the aggregation pipeline with its
    Timer): every count ends equal to PostgreSQL's and the badge to the unmuted sum."""
    settings.COUNTERS_STRATEGY = strategy_name
    settings.DELIVERY_WRITE_PATH = write_path
    ids, convs = setup_chat(make_member)
    env = {"COUNTERS_STRATEGY": strategy_name, "DELIVERY_WRITE_PATH": write_path}
    with running_worker(beat=write_path == "pipeline", workers=2, **env):
        assert service_drift(ids, convs) == []


@pytest.mark.worker
@pytest.mark.parametrize("write_path", ["fanout", "pipeline"])
def test_service_naive_drift_is_detected(write_path, transactional_db, make_member, settings):
    """With ``naive`` the same scenario leaves counts that differ from PostgreSQL."""
    settings.COUNTERS_STRATEGY = "naive"
    settings.DELIVERY_WRITE_PATH = write_path
    ids, convs = setup_chat(make_member)
    env = {"COUNTERS_STRATEGY": "naive", "DELIVERY_WRITE_PATH": write_path}
    with running_worker(beat=write_path == "pipeline", workers=2, **env):
        for _ in range(4):
            if service_drift(ids, convs, n_ops=150):
                return
    pytest.fail("naive never drifted through the services")


# ---- the idle signal the service tests wait for ----------------------------------------------


def test_every_task_is_acknowledged_late():
    """``broker_idle`` relies on it: a task acknowledged when it starts would run unseen."""
    celery_app.loader.import_default_modules()
    tasks = {n: t for n, t in celery_app.tasks.items() if not n.startswith("celery.")}
    assert tasks and [n for n, t in tasks.items() if not t.acks_late] == []


def test_broker_idle_counts_a_message_popped_but_not_yet_unacknowledged():
    """A message a consumer's BRPOP took out of its queue, before the consumer recorded it as
    unacknowledged, keeps the broker busy (the queue and ``unacked`` are both empty then)."""
    assert not worker_ping(), "a worker consumes the test broker"
    broker_reset()
    broker = redis.Redis.from_url(django_settings.CELERY_BROKER_URL, decode_responses=True)
    consumer = redis.ConnectionPool.from_url(django_settings.CELERY_BROKER_URL).get_connection()
    try:
        consumer.send_command("BRPOP", "counters", 0)  # as kombu does: send, read when readable
        wait_until(broker_idle, message="a consumer blocked on an empty queue is not idle")
        broker.lpush("counters", "task")
        # the window: Redis handed the message to the consumer, which has not read it yet
        assert broker.llen("counters") == 0 and broker.hlen("unacked") == 0
        assert not broker_idle()
        assert consumer.read_response() == [b"counters", b"task"]
        broker.hset("unacked", "tag-1", "task")  # kombu's QoS.append
        consumer.send_command("BRPOP", "counters", 0)
        assert not broker_idle()  # reserved or running
        broker.hdel("unacked", "tag-1")  # acknowledged once the task has finished
        wait_until(broker_idle, message="the acknowledged task still counts")
    finally:
        consumer.disconnect()
        broker.close()
        broker_reset()
