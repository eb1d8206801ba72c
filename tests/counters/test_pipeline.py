"""The aggregation pipeline: durable sharded queues, Flusher, Timer and Aggregator, with
exactly-once effect through duplicates, reads racing queued increments, and kills."""

import signal
import time

import pytest
from django.conf import settings as django_settings

from counters.selectors import counters_get
from counters.services import counters_reconcile
from delivery import pipeline
from delivery.failpoints import arm
from delivery.selectors import pipeline_status
from delivery.services import delivery_message_committed
from imcore import services
from imcore.models import User
from tests.conftest import (
    broker_idle,
    broker_reset,
    running_worker,
    start_worker,
    stop,
    wait_until,
)
from tests.helpers import counter_mismatches


def big_group(n_members: int, title: str = "storm"):
    """A group of ``n_members`` users whose counters are loaded in Redis; returns (creator,
    member ids, conversation)."""
    users = User.objects.bulk_create(User(username=f"{title}-{i}") for i in range(n_members))
    conversation, _ = services.conversation_create(
        creator=users[0], kind="group", member_ids=[u.pk for u in users], title=title
    )
    ids = [u.pk for u in users]
    counters_reconcile(user_ids=ids)
    return users[0], ids, conversation


def send(sender, conversation, n: int, tag: str = "m"):
    for i in range(n):
        services.message_send(
            sender=sender, conversation=conversation, body=f"{tag}{i}", client_msg_id=f"{tag}{i}"
        )


def queued() -> int:
    return sum(pipeline.shard_lengths())


def drained() -> bool:
    return queued() == 0 and broker_idle()


# ---- in-process: the Aggregator's logic --------------------------------------------------


def test_batch_folds_messages_into_one_write_per_member(db):
    """Ten messages to a 50-member group become ten queue events and 50 counter writes."""
    sender, ids, conv = big_group(50)
    for seq in range(1, 11):
        delivery_message_committed(conversation_id=conv.pk, seq=seq, sender_id=sender.pk)
    conv.last_seq = 10
    conv.save(update_fields=["last_seq"])
    assert queued() == 10
    (batch,) = pipeline.delivery_aggregate_shard(shard=pipeline.shard_of(conv.pk))
    assert (batch.events_in, batch.conversations, batch.writes_out) == (10, 1, 50)
    assert batch.logical_updates == 500 and batch.ratio == 10
    assert queued() == 0
    assert counters_get(user_id=ids[7]).conversations == {conv.pk: 10}
    assert pipeline_status().recent_flushes[0]["events_in"] == 10


def test_events_delivered_twice_count_once(transactional_db):
    """The same event enqueued twice, or applied again, changes nothing."""
    sender, ids, conv = big_group(5)
    send(sender, conv, 3)
    for seq in (1, 2, 3, 3, 2):
        delivery_message_committed(conversation_id=conv.pk, seq=seq, sender_id=sender.pk)
    pipeline.delivery_drain()
    for seq in (3, 1):
        delivery_message_committed(conversation_id=conv.pk, seq=seq, sender_id=sender.pk)
    pipeline.delivery_drain()
    assert counters_get(user_id=ids[1]).conversations == {conv.pk: 3}
    assert counter_mismatches(ids) == []


def test_read_with_increments_still_queued_never_exceeds_truth(transactional_db):
    """A read lands while increments for older messages wait in the queue: the count never
    comes back above the truth when they are applied."""
    sender, ids, conv = big_group(3)
    send(sender, conv, 5)
    reader = User.objects.get(pk=ids[1])
    membership = reader.membership_set.get(conversation=conv)
    assert services.conversation_mark_read(membership=membership, seq=4) == (1, 1)
    assert queued() == 5
    shard = pipeline.shard_of(conv.pk)
    django_settings.COUNTERS_BATCH_SIZE, size = 2, django_settings.COUNTERS_BATCH_SIZE
    try:
        while queued():
            pipeline.delivery_aggregate_shard(shard=shard)
            assert counters_get(user_id=reader.pk).conversations[conv.pk] <= 1
    finally:
        django_settings.COUNTERS_BATCH_SIZE = size
    assert counters_get(user_id=reader.pk).conversations == {conv.pk: 1}
    assert counter_mismatches(ids) == []


def test_metrics_and_admin_page_show_the_pipeline(transactional_db, client):
    """/metrics and the admin page show queue lengths, lag and recent flushes."""
    sender, ids, conv = big_group(4)
    send(sender, conv, 2)
    text = client.get("/metrics").content.decode()
    shard = pipeline.shard_of(conv.pk)
    assert f'imcore_counter_queue_length{{shard="{shard}"}} 2.0' in text
    pipeline.delivery_drain()
    text = client.get("/metrics").content.decode()
    assert "imcore_counter_flushes_total 1.0" in text
    assert "imcore_counter_events_in_total 2.0" in text
    client.force_login(User.objects.create_superuser("root", "r@example.com", "pw"))
    page = client.get("/admin/delivery/pipeline/")
    assert page.status_code == 200
    assert b"Recent flushes" in page.content and b"Queue shards" in page.content


# ---- across real worker processes ----------------------------------------------------------


@pytest.mark.worker
def test_timer_alone_flushes_within_the_interval(transactional_db, settings):
    """With the threshold out of reach only the Timer (Celery beat) flushes, and the count
    appears within the interval plus one flush."""
    settings.COUNTERS_FLUSH_THRESHOLD = 10**9
    sender, ids, conv = big_group(3)
    with running_worker(beat=True, COUNTERS_FLUSH_THRESHOLD=10**9):
        started = time.monotonic()
        send(sender, conv, 1)
        wait_until(lambda: counters_get(user_id=ids[1]).conversations[conv.pk] == 1, timeout=20)
        waited = time.monotonic() - started
        # the batch goes on (offline-store entries, ack, record) after the counts show
        wait_until(lambda: pipeline_status().recent_flushes, message="no flush recorded")
    flushes = pipeline_status().recent_flushes
    assert {f["trigger"] for f in flushes} == {"timer"}
    # A bound for a failure message, not a speed target: interval + one flush + slack.
    assert waited < django_settings.COUNTERS_FLUSH_INTERVAL + 10


@pytest.mark.worker
def test_flusher_fires_before_the_timer(transactional_db, settings):
    """With a low threshold and no Timer running, crossing the threshold flushes at once;
    below it nothing moves."""
    settings.COUNTERS_FLUSH_THRESHOLD = 5
    sender, ids, conv = big_group(3)
    with running_worker(beat=False):
        send(sender, conv, 4)
        time.sleep(1.0)
        assert counters_get(user_id=ids[1]).conversations[conv.pk] == 0  # no Timer, no flush
        send(sender, conv, 1, tag="x")
        wait_until(lambda: counters_get(user_id=ids[1]).conversations[conv.pk] == 5)
        wait_until(lambda: pipeline_status().recent_flushes, message="no flush recorded")
    assert {f["trigger"] for f in pipeline_status().recent_flushes} == {"flusher"}


@pytest.mark.worker
@pytest.mark.parametrize("point", ["after_read", "mid_apply", "before_ack"])
def test_worker_killed_mid_batch_loses_nothing(point, transactional_db):
    """A worker SIGKILLed at a point of applying a batch, then restarted: once the queues
    drain, every count equals the truth (nothing lost, nothing counted twice)."""
    sender, ids, conv = big_group(40)
    send(sender, conv, 6)
    env = {"COUNTERS_FAILPOINTS": 1, "COUNTERS_SHARD_LOCK_TTL_MS": 1500}
    broker_reset()
    victim = start_worker("victim", pool="solo", **env)
    try:
        arm(f"aggregate.{point}")
        pipeline.delivery_request_aggregate(shard=pipeline.shard_of(conv.pk), trigger="test")
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        stop(victim)
    counts = [counters_get(user_id=uid).conversations[conv.pk] for uid in ids[1:]]
    if point == "mid_apply":
        assert 0 in counts and 6 in counts, counts  # half the members were done
    assert queued() == 6  # the batch is still held, unacknowledged
    with running_worker(beat=True, **env):
        # Not broker_idle(): the killed worker's aggregate task stays in kombu's unacked set
        # until the broker's visibility timeout (an hour); the counts must not wait for it.
        wait_until(lambda: queued() == 0, timeout=30, message="the queue did not drain")
    assert counter_mismatches(ids) == []


@pytest.mark.worker
def test_scaled_down_storm_drains_exact(transactional_db):
    """Several workers and the Timer absorb a storm: 3 groups of 200 members, 1,500 messages
    from 3 processes; the queues drain and every invariant holds, with far fewer aggregator
    tasks than messages."""
    from tests.counters.test_concurrency import run_processes

    groups = [big_group(200, title=f"g{i}") for i in range(3)]
    conv_ids = [conv.pk for _, _, conv in groups]
    sender_ids = [ids[1] for _, ids, _ in groups]
    with running_worker(beat=True, workers=2):
        run_processes(storm_client, 3, conv_ids, sender_ids, 500)
        wait_until(drained, timeout=120, message="the storm did not drain")
    every = [uid for _, ids, _ in groups for uid in ids]
    assert counter_mismatches(every) == []
    totals = pipeline_status().totals
    assert totals["events_in"] >= 1500
    assert totals["flushes"] < 1500 / 2, totals  # batches fold many messages each


def storm_client(seed, conv_ids, sender_ids, n):
    from django.db import connections

    from imcore.models import Conversation

    try:
        conversations = [Conversation.objects.get(pk=c) for c in conv_ids]
        senders = [User.objects.get(pk=u) for u in sender_ids]
        for i in range(n):
            k = (seed + i) % len(conversations)
            services.message_send(
                sender=senders[k],
                conversation=conversations[k],
                body="s",
                client_msg_id=f"storm-{seed}-{i}",
            )
    finally:
        connections.close_all()
