"""The messaging services under concurrency: dense seqs and idempotent sends."""

import pytest
from django.db import connections

from imcore import services
from imcore.models import Conversation, Message, User
from tests.counters.test_concurrency import run_processes


def send_many(seed: int, conversation_id: int, user_ids: list[int], n: int) -> list[int]:
    """One client process sending ``n`` messages; returns the seqs it got."""
    conversation = Conversation.objects.get(pk=conversation_id)
    users = list(User.objects.filter(pk__in=user_ids))
    seqs = []
    try:
        for i in range(n):
            message, _ = services.message_send(
                sender=users[(seed + i) % len(users)],
                conversation=conversation,
                body=f"{seed}-{i}",
                client_msg_id=f"p{seed}-{i}",
            )
            seqs.append(message.seq)
    finally:
        connections.close_all()
    return seqs


def send_same(seed: int, conversation_id: int, user_id: int) -> tuple[int, int]:
    """Every process sends the same client_msg_id; returns (message id, seq)."""
    try:
        message, _ = services.message_send(
            sender=User.objects.get(pk=user_id),
            conversation=Conversation.objects.get(pk=conversation_id),
            body="once",
            client_msg_id="the-same-one",
        )
        return message.pk, message.seq
    finally:
        connections.close_all()


@pytest.fixture
def group(transactional_db):
    users = [User.objects.create_user(f"s{i}") for i in range(3)]
    conversation, _ = services.conversation_create(
        creator=users[0], kind="group", member_ids=[u.pk for u in users[1:]]
    )
    return conversation, [u.pk for u in users]


def test_concurrent_sends_get_dense_unique_seqs(group):
    """Four processes sending to one conversation get seqs 1..N with no gap or repeat."""
    conversation, user_ids = group
    results = run_processes(send_many, 4, conversation.pk, user_ids, 25)
    seqs = sorted(s for r in results for s in r)
    assert seqs == list(range(1, 101))
    assert list(
        Message.objects.filter(conversation=conversation)
        .order_by("seq")
        .values_list("seq", flat=True)
    ) == list(range(1, 101))
    conversation.refresh_from_db()
    assert conversation.last_seq == 100


def test_concurrent_retries_store_one_message(group):
    """The same client_msg_id sent by four processes at once is stored once, seq 1."""
    conversation, user_ids = group
    results = run_processes(send_same, 4, conversation.pk, user_ids[1])
    assert len(set(results)) == 1
    assert Message.objects.filter(conversation=conversation).count() == 1
    conversation.refresh_from_db()
    assert conversation.last_seq == 1
