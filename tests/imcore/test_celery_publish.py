"""Sending a task never waits for the broker longer than ``CELERY_TASK_PUBLISH_RETRY_POLICY``
allows, its ``task-sent`` event included (:class:`imcore.celery.App`). On a private
``redis-server`` as the broker, stopped at the worst moment and back after ``OUTAGE_S``."""

import threading
import time

from celery.signals import after_task_publish

from delivery.tasks import flusher
from imcore.celery import app
from tests.processes import RedisServer

OUTAGE_S = 8  # what a send waited before the fix: until the broker was back


def test_a_task_sent_just_before_the_broker_goes_down_does_not_wait_for_it():
    """The broker dies between the task's message and its ``task-sent`` event: the send
    returns within the retry policy (the event is dropped) instead of retrying the event's
    publish, one second apart, until the broker is back."""
    assert app.conf.task_send_sent_event  # the event whose publish used to wait
    broker = RedisServer()
    broker.start()
    back = threading.Timer(OUTAGE_S, broker.start)
    stopped = threading.Event()

    def broker_down(**_):  # after the task's message is published, before its event
        if not stopped.is_set():
            stopped.set()
            broker.stop()  # SIGKILL: the port refuses connections at once
            back.start()

    after_task_publish.connect(broker_down, weak=False)
    try:
        with app.connection_for_write(broker.url(0)) as connection:
            started = time.monotonic()
            flusher.apply_async(kwargs={"shard": 0}, connection=connection)
            took = time.monotonic() - started
    finally:
        after_task_publish.disconnect(broker_down)
        back.cancel()  # not needed once the send has returned
        if back.is_alive():
            back.join()
        broker.close()
    assert stopped.is_set(), "the broker was not stopped: the hook did not run"
    assert took < 3, f"the send waited {took:.1f} s for the broker"
