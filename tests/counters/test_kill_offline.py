"""Offline-store entries across a worker SIGKILLed in the middle of a batch: once another
aggregator has applied the batch again, every member (the sender included) holds exactly one
entry per message, in order, none missing and none twice."""

import signal
from collections import Counter

import pytest

from counters.selectors import counters_get
from delivery import pipeline
from delivery.failpoints import arm
from offline import keys, store
from tests.conftest import broker_reset, start_worker, stop, wait_until
from tests.counters.test_pipeline import big_group, queued, send
from tests.helpers import counter_mismatches

pytestmark = [pytest.mark.worker]

MESSAGES = 6


def message_seqs(user_id: int, conversation_id: int) -> list[int]:
    """The seqs of the user's message entries for the conversation, in version order."""
    log = map(store.Entry.parse, store.client().zrange(keys.log(user_id), 0, -1))
    return [int(e.arg) for e in log if e.type == "m" and e.conversation_id == conversation_id]


@pytest.mark.parametrize("point", ["mid_apply", "before_ack"])
def test_entries_are_written_exactly_once_across_a_mid_batch_kill(point, transactional_db):
    """A worker dies at ``point`` of a batch (half its members done, or all done but nothing
    acknowledged); the next aggregator applies the batch again and every member's store holds
    each of the 6 messages once."""
    sender, ids, conv = big_group(40)
    send(sender, conv, MESSAGES)
    broker_reset()
    victim = start_worker(
        "victim", pool="solo", COUNTERS_FAILPOINTS=1, COUNTERS_SHARD_LOCK_TTL_MS=1000
    )
    try:
        arm(f"aggregate.{point}")
        pipeline.delivery_request_aggregate(shard=pipeline.shard_of(conv.pk), trigger="test")
        assert victim.wait(60) == -signal.SIGKILL
    finally:
        stop(victim)
        broker_reset()
    written = Counter(len(message_seqs(uid, conv.pk)) for uid in ids)
    if point == "mid_apply":
        assert set(written) == {0, MESSAGES}, written  # half the members have their entries
    else:
        assert set(written) == {MESSAGES}, written  # all written, nothing acknowledged
    assert queued() == MESSAGES
    # The next aggregator takes the dead one's unacknowledged events once its lock expires.
    wait_until(lambda: pipeline.delivery_aggregate_shard(shard=pipeline.shard_of(conv.pk)))
    assert queued() == 0
    for uid in ids:
        assert message_seqs(uid, conv.pk) == list(range(1, MESSAGES + 1)), uid
        versions = [int(v) for _, v in store.client().zrange(keys.log(uid), 0, -1, withscores=True)]
        assert versions == sorted(set(versions))
    assert counters_get(user_id=ids[1]).conversations == {conv.pk: MESSAGES}
    assert counter_mismatches(ids) == []
