"""Celery tasks of the counters app.

``counters.reconcile`` rebuilds counters from PostgreSQL (all users, or the ones given) and
logs what differed; Celery beat runs it every ``COUNTERS_RECONCILE_INTERVAL_S``.

The tasks that deliver messages (``counters.timer``, ``counters.flusher``,
``counters.aggregate``, ``counters.batch_message``, ``counters.fanout_message``) live in
:mod:`delivery.tasks` under their old names.
"""

from celery import shared_task

from . import services


@shared_task(name="counters.reconcile", queue="counters", max_retries=0)
def reconcile(user_ids: list[int] | None = None) -> dict:
    report = services.counters_reconcile(user_ids=user_ids)
    return {
        "users_checked": report.users_checked,
        "users_differed": len(report.diffs),
        "users_not_loaded": report.users_not_loaded,
    }
