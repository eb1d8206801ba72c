"""The Aggregator's edges with a real worker: the budget continuation, the shard lock renewed
between chunks of one batch, two aggregators never applying one shard at once, and a Flusher
that finds its shard already drained."""

import contextlib
import time

import pytest

from counters.redis import get_redis
from delivery import keys
from delivery.failpoints import arm_pause, disarm_pause
from delivery.pipeline import (
    delivery_aggregate_shard,
    delivery_drain,
    delivery_request_aggregate,
    shard_of,
)
from delivery.selectors import pipeline_status
from delivery.tasks import aggregate
from imcore.celery import app as celery_app
from tests.conftest import broker_idle, running_worker, wait_until
from tests.counters.test_pipeline import big_group, queued, send
from tests.helpers import counter_mismatches

pytestmark = [pytest.mark.worker]

LOCK_TTL_MS = 1500
PAUSE_MS = 400  # at the end of every chunk of 2 users: a batch of 16 users lasts > 3 s
EDGE = {
    "COUNTERS_BATCH_SIZE": 3,
    "COUNTERS_AGGREGATE_BUDGET_S": 0,  # hand over after every full batch
    "COUNTERS_SHARD_LOCK_TTL_MS": LOCK_TTL_MS,
    "COUNTERS_APPLY_CHUNK_USERS": 2,
    "COUNTERS_FAILPOINTS": 1,
}


@pytest.fixture(scope="module")
def edge_worker(django_db_setup, django_db_blocker):
    """One worker (two pool processes, no Timer) for the module's tests."""
    with running_worker(**EDGE) as proc:
        yield proc


def flushes() -> list[tuple[str, int]]:
    """(trigger, events) of the recorded flushes, oldest first."""
    return [(f["trigger"], f["events_in"]) for f in reversed(pipeline_status().recent_flushes)]


def tasks_run(name: str) -> int:
    """How many ``name`` tasks the (one) worker has taken since it started."""
    for _ in range(10):  # a worker busy on a loaded machine may miss one inspect's timeout
        with celery_app.connection_for_write() as conn:
            stats = celery_app.control.inspect(timeout=2, limit=1, connection=conn).stats()
        if stats:
            return sum(s["total"].get(name, 0) for s in stats.values())
    pytest.fail("the worker did not answer inspect stats")


@contextlib.contextmanager
def paused_chunks():
    """Every chunk of an aggregator's batch ends with a pause of ``PAUSE_MS``."""
    arm_pause("aggregate.after_chunk", PAUSE_MS)
    try:
        yield
    finally:
        disarm_pause("aggregate.after_chunk")


def test_a_spent_budget_hands_the_rest_to_a_continuation(transactional_db, edge_worker, settings):
    """An aggregator whose budget is spent after a full batch stops and requests a
    ``continue`` aggregate, which a worker runs (and hands on again) until the shard is
    drained: 7 events in batches of 3, 3 and 1, every count exact."""
    settings.COUNTERS_BATCH_SIZE = 3
    settings.COUNTERS_AGGREGATE_BUDGET_S = 0
    sender, ids, conv = big_group(4)
    send(sender, conv, 7)
    done = delivery_aggregate_shard(shard=shard_of(conv.pk), trigger="timer")
    assert [b.events_in for b in done] == [3]
    wait_until(lambda: queued() == 0 and broker_idle(), message="no continuation drained it")
    assert flushes() == [("timer", 3), ("continue", 3), ("continue", 1)]
    assert counter_mismatches(ids) == []


def test_the_shard_lock_is_renewed_between_chunks(transactional_db, edge_worker):
    """A batch of 16 users in chunks of 2 outlasts the lock's TTL; the lock is renewed
    after every chunk, so another aggregator trying the shard all along gets nothing and the
    batch is applied once."""
    sender, ids, conv = big_group(16)
    send(sender, conv, 2)
    shard = shard_of(conv.pk)
    with paused_chunks():
        delivery_request_aggregate(shard=shard, trigger="test")
        wait_until(lambda: get_redis().exists(keys.shard_lock(shard)), message="never started")
        started, tries = time.monotonic(), 0
        while not pipeline_status().recent_flushes:
            assert delivery_aggregate_shard(shard=shard, trigger="second") == []
            tries += 1
            time.sleep(0.05)
        held = time.monotonic() - started
    assert held > 1.5 * LOCK_TTL_MS / 1000 and tries > 10  # it outlived its first TTL
    assert flushes() == [("test", 2)]
    assert counter_mismatches(ids) == []


def test_two_aggregators_never_apply_one_shard_at_once(transactional_db, edge_worker):
    """Two aggregate tasks for one shard on two worker processes at the same time: the one
    that gets the shard's lock applies the batch, the other does nothing."""
    sender, ids, conv = big_group(10)
    send(sender, conv, 2)
    shard = shard_of(conv.pk)
    before = tasks_run("counters.aggregate")
    with paused_chunks():
        aggregate.delay(shard=shard, trigger="first")
        wait_until(lambda: get_redis().exists(keys.shard_lock(shard)), message="never started")
        aggregate.delay(shard=shard, trigger="second")
        wait_until(lambda: tasks_run("counters.aggregate") == before + 2, timeout=10)
        assert not pipeline_status().recent_flushes  # the first is still at work
        wait_until(lambda: pipeline_status().recent_flushes, message="the batch never ended")
    wait_until(broker_idle)
    assert flushes() == [("first", 2)]
    assert counter_mismatches(ids) == []


@contextlib.contextmanager
def counters_queue_held():
    """The workers stop taking tasks from the ``counters`` queue meanwhile."""
    with celery_app.connection_for_write() as conn:
        celery_app.control.cancel_consumer("counters", reply=True, connection=conn)
    try:
        yield
    finally:
        with celery_app.connection_for_write() as conn:
            celery_app.control.add_consumer("counters", reply=True, connection=conn)


def test_a_flusher_that_finds_its_shard_drained_sends_no_aggregate(
    transactional_db, edge_worker, settings
):
    """A send crosses the Flusher's threshold, but an aggregator drains the shard before the
    Flusher runs: the Flusher sends no aggregate and leaves the shard's flag clear."""
    settings.COUNTERS_FLUSH_THRESHOLD = 2
    sender, ids, conv = big_group(3)
    shard = shard_of(conv.pk)
    flushers, aggregates = tasks_run("counters.flusher"), tasks_run("counters.aggregate")
    with counters_queue_held():
        send(sender, conv, 2)  # the second send sets the flag and sends the Flusher
        assert get_redis().exists(keys.shard_flush_flag(shard))
        delivery_drain()  # an aggregator drains the shard first
    wait_until(lambda: tasks_run("counters.flusher") == flushers + 1, message="no Flusher ran")
    wait_until(broker_idle)
    assert tasks_run("counters.aggregate") == aggregates
    assert not get_redis().exists(keys.shard_flush_flag(shard))
    assert counter_mismatches(ids) == []
