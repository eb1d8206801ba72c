"""Assertions shared by the counter tests: Redis against the truth in PostgreSQL."""

from counters.selectors import counters_peek, counters_truth
from imcore.models import User


def counter_mismatches(user_ids=None) -> list[str]:
    """Every way in which Redis differs from PostgreSQL, as readable lines (empty = exact)."""
    if user_ids is None:
        user_ids = list(User.objects.values_list("pk", flat=True))
    problems = []
    for user_id in user_ids:
        truth = counters_truth(user_id=user_id)
        held = counters_peek(user_id=user_id)
        if held is None:
            problems.append(f"user {user_id}: not loaded in Redis")
            continue
        if held.conversations != truth.conversations:
            problems.append(f"user {user_id}: unread {held.conversations} != {truth.conversations}")
        if held.mentions != truth.mentions:
            problems.append(f"user {user_id}: mentions {held.mentions} != {truth.mentions}")
        if held.badge != truth.badge:
            problems.append(f"user {user_id}: badge {held.badge} != {truth.badge}")
        if any(n < 0 for n in held.conversations.values()) or held.badge < 0:
            problems.append(f"user {user_id}: negative count {held}")
    return problems
