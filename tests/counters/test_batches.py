"""The celery-batches write path (``DELIVERY_WRITE_PATH=batches``): one task message per
committed message, buffered by a real worker process and applied in batches with the
Aggregator's code; folded, exact, and counted once through duplicates, redeliveries and a
worker SIGKILLed with messages in its buffer or half-way through a batch."""

import signal

import pytest
from kombu import Connection

from counters.selectors import counters_get
from delivery.failpoints import arm
from delivery.selectors import pipeline_status
from delivery.tasks import batch_message
from imcore.celery import app as celery_app
from tests.conftest import (
    broker_idle,
    broker_reset,
    running_worker,
    start_worker,
    stop,
    wait_until,
    worker_ping,
)
from tests.counters.test_pipeline import big_group, send
from tests.helpers import counter_mismatches

pytestmark = [pytest.mark.worker]

FLUSH_EVERY = 25
# The worker flushes by count only: the interval is out of the tests' reach, so a batch that
# ran proves the prefetch lets a full buffer in (at the default 4 x 2 it could hold 8).
COUNT_ONLY = {
    "DELIVERY_WRITE_PATH": "batches",
    "COUNTERS_BATCHES_FLUSH_EVERY": FLUSH_EVERY,
    "COUNTERS_FLUSH_INTERVAL": 120,
}


@pytest.fixture(autouse=True)
def batches_path(settings):
    settings.DELIVERY_WRITE_PATH = "batches"


@pytest.fixture(scope="class")
def count_only_worker(django_db_setup, django_db_blocker):
    """One worker for the tests of a class; stopped before the kill test starts its own."""
    with running_worker(**COUNT_ONLY) as proc:
        yield proc


def broker_held() -> tuple[int, int]:
    """(task messages waiting in the counters queue, delivered but unacknowledged)."""
    with celery_app.connection_for_write() as conn:
        client = conn.default_channel.client
        return client.llen("counters"), client.hlen("unacked")


def restore_unacked() -> int:
    """What kombu does for a dead consumer's messages once the broker's visibility timeout
    (an hour) has passed: put every unacknowledged message back in its queue. Returns their
    number. Only while no live worker holds messages unacknowledged."""
    with Connection(
        celery_app.conf.broker_url, transport_options={"visibility_timeout": 0}
    ) as conn:
        channel = conn.default_channel
        held = channel.client.hlen("unacked")
        channel.qos.restore_visible(num=10_000, interval=1)
        return held


class TestOneWorker:
    """Tests sharing one worker that flushes by count only."""

    def test_storm_is_folded_and_exact(self, transactional_db, count_only_worker):
        """100 messages to a 200-member group: four batches of 25 task messages, one counter call
        per member per batch (4, not 100), and every count equals the truth."""
        sender, ids, conv = big_group(200)
        send(sender, conv, 100)
        wait_until(
            lambda: counters_get(user_id=ids[-1]).conversations[conv.pk] == 100,
            message="the batches were not applied (a buffer short of flush_every waits 120 s)",
        )
        wait_until(broker_idle, message="the worker did not acknowledge its batches")
        assert counter_mismatches(ids) == []
        flushes = pipeline_status().recent_flushes
        assert [(f["trigger"], f["shard"], f["events_in"]) for f in flushes] == [
            ("batches", -1, FLUSH_EVERY)
        ] * 4
        assert all(f["writes_out"] == 200 and f["logical_updates"] == 200 * 25 for f in flushes)
        totals = pipeline_status().totals
        assert totals["events_in"] == 100 and totals["flushes"] == 4
        assert totals["users"] / len(ids) == 4 < 100  # counter calls per member, against messages

    def test_duplicates_and_stale_events_count_once(self, transactional_db, count_only_worker):
        """A client repeating sends (each repeat sends the task again) and late copies of older
        events, in one batch with the originals: every member is counted up to the newest seq,
        once, with a single counter call."""
        sender, ids, conv = big_group(30)
        send(sender, conv, 3)  # 3 task messages
        for _ in range(2):
            send(sender, conv, 3)  # the same client_msg_ids: 6 repeats, nothing new stored
        for seq in (3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3):  # 16 more: 25 in all
            batch_message.delay(conversation_id=conv.pk, seq=seq)
        wait_until(broker_idle, message="the batch did not run")
        assert counters_get(user_id=ids[5]).conversations == {conv.pk: 3}
        assert counter_mismatches(ids) == []
        (flush,) = pipeline_status().recent_flushes
        assert (flush["events_in"], flush["conversations"], flush["users"]) == (25, 1, 30)


def test_worker_killed_with_a_buffer_loses_nothing(transactional_db):
    """Buffered task messages stay unacknowledged until their batch has run; a worker
    SIGKILLed half-way through applying a batch loses none of them (the broker keeps them) but
    nothing applies them until they are redelivered; redelivered, they count once."""
    if stale := worker_ping():
        pytest.fail(f"another Celery worker consumes the test broker: {stale}")
    sender, ids, conv = big_group(40)
    broker_reset()
    # Batches of exactly 6 messages, whenever they arrive (the interval, 5 s, only picks up a
    # batch the task sent again after a database or Redis error).
    env = {
        **COUNT_ONLY,
        "COUNTERS_BATCHES_FLUSH_EVERY": 6,
        "COUNTERS_FLUSH_INTERVAL": 5,
        "COUNTERS_FAILPOINTS": 1,
    }
    victim = start_worker("victim", pool="solo", **env)
    try:
        arm("aggregate.mid_apply")
        send(sender, conv, 5)
        wait_until(lambda: broker_held() == (0, 5), message="the worker did not buffer them")
        assert counters_get(user_id=ids[1]).conversations == {conv.pk: 0}
        send(sender, conv, 1, tag="sixth")  # the buffer is full: the batch runs, and dies
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        stop(victim)
    counts = [counters_get(user_id=uid).conversations[conv.pk] for uid in ids[1:]]
    assert 0 in counts and 6 in counts, counts  # half the members were done
    assert broker_held() == (0, 6)  # kept, unacknowledged: back after the visibility timeout
    assert restore_unacked() == 6
    assert broker_held() == (6, 0)
    send(sender, conv, 1, tag="late")
    worker = start_worker("healthy", **{**COUNT_ONLY, "COUNTERS_FLUSH_INTERVAL": 0.3})
    try:
        wait_until(broker_idle, message="the worker did not drain the redelivered messages")
    finally:
        stop(worker)
        broker_reset()
    # The half done before the kill is not counted twice.
    assert counters_get(user_id=ids[1]).conversations == {conv.pk: 7}
    assert counter_mismatches(ids) == []
