"""A Hypothesis state machine drives random sends (some with mentions), deliveries of queued
increments (in any order), reads, mutes, joins, leaves, recalls, edits and Redis wipes through
the services, against a plain model of the truth; after every step the counter invariants
hold. Group B is in channel mode (its deliveries raise the channel's top), the others go
through the aggregate form."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from counters.redis import get_redis
from counters.selectors import counters_get, counters_truth
from delivery.services import delivery_convert, delivery_fanout, delivery_message_committed
from imcore import services
from imcore.models import Conversation, Membership, User

N_USERS = 4
MACHINE_SETTINGS = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class CounterMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        get_redis().flushdb()
        self.users = [User.objects.create_user(f"sm-{User.objects.count()}-{i}") for i in range(4)]
        u = self.users
        self.convs = [
            services.conversation_create(
                creator=u[0], kind="group", member_ids=[u[1].pk, u[2].pk], title="A"
            )[0],
            services.conversation_create(
                creator=u[0], kind="group", member_ids=[u[1].pk, u[3].pk], title="B"
            )[0],
            services.conversation_create(creator=u[2], kind="direct", member_ids=[u[3].pk])[0],
        ]
        # the model: per conversation its last seq and {user index: [read, muted]}
        self.last_seq = [0, 0, 0]
        self.members = [
            {0: [0, False], 1: [0, False], 2: [0, False]},
            {0: [0, False], 1: [0, False], 3: [0, False]},
            {2: [0, False], 3: [0, False]},
        ]
        # queued increments (conv, seq, sender, mentioned user indexes, mention_all)
        self.pending: list[tuple[int, int, int, frozenset, bool]] = []
        # per conversation, its messages with mentions: (seq, sender, mentioned, mention_all)
        self.mentioning: list[list[tuple[int, int, frozenset, bool]]] = [[], [], []]
        # per conversation: the sender of each seq, and the recalled seqs
        self.senders: list[dict[int, int]] = [{}, {}, {}]
        self.recalled: list[set[int]] = [set(), set(), set()]
        # group B counts in channel form
        assert delivery_convert(conversation_id=self.convs[1].pk, force="channel") == "channel"

    def membership(self, ui, ci):
        return Membership.objects.select_related("conversation").get(
            user=self.users[ui], conversation=self.convs[ci]
        )

    def unread_of(self, ci, read_seq):
        """Messages above the pointer that were not recalled."""
        return self.last_seq[ci] - read_seq - sum(1 for s in self.recalled[ci] if s > read_seq)

    def model_unread(self, ui):
        return {
            self.convs[ci].pk: self.unread_of(ci, m[ui][0])
            for ci, m in enumerate(self.members)
            if ui in m
        }

    def model_mentions(self, ui):
        """Unread mentions: messages above the read pointer, from someone else, that mention
        the user or everyone; only conversations with some."""
        out = {}
        for ci, m in enumerate(self.members):
            if ui in m:
                n = sum(
                    1
                    for seq, sender, mentioned, everyone in self.mentioning[ci]
                    if seq > m[ui][0]
                    and sender != ui
                    and (everyone or ui in mentioned)
                    and seq not in self.recalled[ci]
                )
                if n:
                    out[self.convs[ci].pk] = n
        return out

    def model_badge(self, ui):
        return sum(
            self.unread_of(ci, m[ui][0])
            for ci, m in enumerate(self.members)
            if ui in m and not m[ui][1]
        )

    @rule(
        ui=st.integers(0, N_USERS - 1),
        ci=st.integers(0, 2),
        mention=st.sets(st.integers(0, N_USERS - 1), max_size=2),
        everyone=st.booleans(),
    )
    def send(self, ui, ci, mention, everyone):
        if ui not in self.members[ci]:
            return
        mentioned = frozenset(i for i in mention if i in self.members[ci])
        everyone = everyone and ci < 2 and ui == 0  # u0 created both groups
        message, created = services.message_send(
            sender=self.users[ui],
            conversation=self.convs[ci],
            body="x",
            client_msg_id=f"c{self.convs[ci].pk}-{self.last_seq[ci] + 1}",
            mentions=[self.users[i].pk for i in mentioned],
            mention_all=everyone,
        )
        assert created
        self.last_seq[ci] += 1
        assert message.seq == self.last_seq[ci]
        self.members[ci][ui][0] = message.seq
        self.senders[ci][message.seq] = ui
        self.pending.append((ci, message.seq, ui, mentioned, everyone))
        if mentioned or everyone:
            self.mentioning[ci].append((message.seq, ui, mentioned, everyone))

    def fanout(self, ci, seq, ui, mentioned, everyone):
        mode = Conversation.objects.values_list("mode", flat=True).get(pk=self.convs[ci].pk)
        if mode != Conversation.Mode.AGGREGATE:
            # (the send's hand-over, which the test transaction never commits)
            delivery_message_committed(
                conversation_id=self.convs[ci].pk,
                seq=seq,
                sender_id=self.users[ui].pk,
                mentions=[self.users[i].pk for i in mentioned],
                mention_all=everyone,
                mode=mode,
            )
            return
        delivery_fanout(
            conversation_id=self.convs[ci].pk,
            seq=seq,
            sender_id=self.users[ui].pk,
            mentions=[self.users[i].pk for i in mentioned],
            mention_all=everyone,
        )

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def deliver_one(self, data):
        """The worker applies one queued increment, not necessarily the oldest."""
        self.fanout(*self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1))))

    @rule()
    def deliver_all(self):
        for event in reversed(self.pending):
            self.fanout(*event)
        self.pending.clear()

    @rule(ui=st.integers(0, N_USERS - 1), ci=st.integers(0, 2), frac=st.floats(0, 1))
    def read(self, ui, ci, frac):
        self.read_up_to(ui, ci, frac)

    @rule(ui=st.integers(0, N_USERS - 1), ci=st.integers(0, 2))
    def read_all(self, ui, ci):
        """A client opens the conversation: read up to its last message (past any mention)."""
        self.read_up_to(ui, ci, 1.0)

    def read_up_to(self, ui, ci, frac):
        if ui not in self.members[ci]:
            return
        seq = round(self.last_seq[ci] * frac)
        unread, badge = services.conversation_mark_read(membership=self.membership(ui, ci), seq=seq)
        model = self.members[ci][ui]
        model[0] = max(model[0], seq)
        assert unread == self.unread_of(ci, model[0])
        assert 0 <= badge <= self.model_badge(ui)

    @rule(ci=st.integers(0, 2), frac=st.floats(0, 1), by_creator=st.booleans())
    def recall(self, ci, frac, by_creator):
        """The sender (or a group's creator) recalls a message, maybe one recalled already or
        not delivered yet."""
        if not self.last_seq[ci]:
            return
        seq = max(1, round(self.last_seq[ci] * frac))
        actor = 0 if by_creator and ci < 2 else self.senders[ci][seq]
        if actor not in self.members[ci]:
            return
        message, changed = services.message_recall(
            actor=self.users[actor], conversation_id=self.convs[ci].pk, seq=seq
        )
        assert message.deleted and changed == (seq not in self.recalled[ci])
        self.recalled[ci].add(seq)

    @rule(ci=st.integers(0, 2), frac=st.floats(0, 1))
    def edit(self, ci, frac):
        """The sender edits a message: no count moves."""
        if not self.last_seq[ci]:
            return
        seq = max(1, round(self.last_seq[ci] * frac))
        sender = self.senders[ci][seq]
        if sender not in self.members[ci] or seq in self.recalled[ci]:
            return
        services.message_edit(
            actor=self.users[sender], conversation_id=self.convs[ci].pk, seq=seq, body="edited"
        )

    @rule(ui=st.integers(0, N_USERS - 1), ci=st.integers(0, 2), muted=st.booleans())
    def mute(self, ui, ci, muted):
        if ui not in self.members[ci]:
            return
        services.conversation_mute(membership=self.membership(ui, ci), muted=muted)
        self.members[ci][ui][1] = muted

    @rule(ui=st.integers(0, N_USERS - 1), ci=st.integers(0, 1))
    def join(self, ui, ci):
        actor = next(iter(self.members[ci]), None)
        if actor is None or ui in self.members[ci]:
            return
        services.members_add(
            actor=self.users[actor], conversation=self.convs[ci], user_ids=[self.users[ui].pk]
        )
        self.members[ci][ui] = [self.last_seq[ci], False]

    @rule(ui=st.integers(0, N_USERS - 1), ci=st.integers(0, 1))
    def leave(self, ui, ci):
        if ui not in self.members[ci]:
            return
        services.member_remove(
            actor=self.users[ui], conversation=self.convs[ci], user_id=self.users[ui].pk
        )
        del self.members[ci][ui]

    @rule()
    def wipe_redis(self):
        """Redis restarts empty."""
        get_redis().flushdb()

    @invariant()
    def counters_hold(self):
        for ui, user in enumerate(self.users):
            truth = counters_truth(user_id=user.pk)
            assert truth.conversations == self.model_unread(ui), "PostgreSQL differs from model"
            assert truth.badge == self.model_badge(ui)
            assert truth.mentions == self.model_mentions(ui)
            held = counters_get(user_id=user.pk)
            muted = {self.convs[ci].pk for ci, m in enumerate(self.members) if m.get(ui, [0, 0])[1]}
            assert set(held.conversations) == set(truth.conversations)
            for cid, n in held.conversations.items():
                assert 0 <= n <= truth.conversations[cid], (cid, n, truth)
            assert held.badge == sum(n for c, n in held.conversations.items() if c not in muted)
            for cid, n in held.mentions.items():
                assert 0 < n <= truth.mentions.get(cid, 0), (cid, n, truth)
            if not self.pending:
                assert held == truth


@pytest.mark.parametrize("strategy_name", ["lua", "watch", "lock"])
def test_counters_match_model_of_truth(strategy_name, db, settings):
    """Random interleavings of every operation keep the counters and mentions within the
    truth, the badge equal to the unmuted sum, and both exact once the queue is drained."""
    settings.COUNTERS_STRATEGY = strategy_name
    # no group converts by itself here (group B is converted once, by the machine)
    settings.LARGE_GROUP_MIN_MEMBERS = 1000
    settings.LARGE_GROUP_EXIT_MEMBERS = 0
    run_state_machine_as_test(CounterMachine, settings=MACHINE_SETTINGS)
