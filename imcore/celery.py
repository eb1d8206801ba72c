"""The Celery application: broker and settings come from Django settings (``CELERY_*``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "imcore.settings")


class App(Celery):
    """Celery, with every publish bounded by ``task_publish_retry_policy``.

    Celery publishes a task's message with that policy, then its ``task-sent`` event
    (``task_send_sent_event``, for Flower) with the policy the caller passed, which is none
    for a ``delay()``: kombu then retries that publish forever, one second apart, while
    holding the event dispatcher's lock. When the broker went down between the two publishes,
    the request that sent the task waited for the broker to come back, and every other request
    sending a task waited behind it (a send took over 15 s in the broker-outage fault test).
    With the policy given, the event's publish fails like the task's and the dispatcher
    swallows the error (``buffer_while_offline``): the task was sent, Flower misses its "sent"
    state."""

    def send_task(self, name, *args, **options):
        if options.get("retry_policy") is None:
            options["retry_policy"] = dict(self.conf.task_publish_retry_policy)
        return super().send_task(name, *args, **options)


app = App("imcore")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
