"""Celery tasks of the offline app (thin: each calls one service).

- ``offline.prepare_device``: a device came back (login, or its first pull after
  ``SYNC_AWAY_AFTER_S``); its package is built so that its pulls are cheap reads.
- ``offline.flush_acks``: writes the absorbed acks to PostgreSQL in one batch; Celery beat
  runs it every ``SYNC_ACK_FLUSH_INTERVAL_S`` and an ack sends it at once past
  ``SYNC_ACK_FLUSH_THRESHOLD`` waiting devices.
- ``offline.trim``: retention; Celery beat runs it every ``OFFLINE_TRIM_INTERVAL_S``.
- ``offline.push_due``: sends the push notifications that are due (see :mod:`offline.push`);
  Celery beat runs it every ``PUSH_TICK_S``.
"""

import redis
from celery import shared_task

from . import push, services


@shared_task(
    name="offline.prepare_device",
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    max_retries=3,
)
def prepare_device(device_pk: int) -> str:
    return services.offline_prepare_device(device_pk=device_pk)


@shared_task(name="offline.flush_acks", acks_late=True, max_retries=0)
def flush_acks() -> int:
    return services.offline_flush_acks()


@shared_task(name="offline.trim", max_retries=0)
def trim() -> tuple[int, int]:
    return services.offline_trim()


@shared_task(name="offline.push_due", max_retries=0)
def push_due() -> int:
    return push.push_send_due()
