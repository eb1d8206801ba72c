"""``counters.batch_message`` when its batch keeps failing: celery-batches acknowledges a
batch whose body raised, so the task sends its events again itself, each at most
``COUNTERS_BATCHES_MAX_RESENDS`` times, then drops and logs them; the next message of the
conversation repairs the counts. A real worker whose counter store refuses connections."""

import pytest

from counters.selectors import counters_get
from delivery.pipeline import delivery_drain
from tests.conftest import broker_idle, running_worker, wait_until
from tests.counters.test_pipeline import big_group, send
from tests.helpers import counter_mismatches

pytestmark = [pytest.mark.worker]

DEAD_REDIS = "redis://127.0.0.1:1/0"
MAX_RESENDS = 2
BATCHES = {
    "DELIVERY_WRITE_PATH": "batches",
    "COUNTERS_BATCHES_FLUSH_EVERY": 1000,
    "COUNTERS_FLUSH_INTERVAL": 0.3,
    "COUNTERS_BATCHES_MAX_RESENDS": MAX_RESENDS,
}


def test_a_failing_batch_is_sent_again_a_bounded_number_of_times(transactional_db, settings, capfd):
    """With the worker's Redis down, one message's event is sent again twice (1 s, then 2 s
    later), then dropped with an error in the log, and nothing is left in the broker; once
    Redis is back, the next message of the conversation makes every count exact."""
    settings.DELIVERY_WRITE_PATH = "batches"
    sender, ids, conv = big_group(5)
    log = []

    def logged(text: str) -> int:
        log.append(capfd.readouterr().err)
        return "".join(log).count(text)

    with running_worker(**BATCHES, REDIS_URL=DEAD_REDIS):
        send(sender, conv, 1)
        wait_until(
            lambda: logged("dropped 1 events after 2 resends"),
            timeout=30,
            message="the failing event was never dropped",
        )
        wait_until(broker_idle, message="the dropped event left tasks in the broker")
    assert logged("sending it again") == MAX_RESENDS
    assert logged("dropped 1 events") == 1
    assert counters_get(user_id=ids[1]).conversations == {conv.pk: 0}  # the drop, for now

    # The next message of the conversation (applied in-process, by the same code a batch
    # runs) counts the dropped one too.
    settings.DELIVERY_WRITE_PATH = "pipeline"
    send(sender, conv, 1, tag="next")
    delivery_drain()
    assert counters_get(user_id=ids[1]).conversations == {conv.pk: 2}
    assert counter_mismatches(ids) == []
