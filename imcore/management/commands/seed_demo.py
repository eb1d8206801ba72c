"""Create the demo admin, users, conversations and messages (safe to run again)."""

from django.core.management.base import BaseCommand

from counters.services import counters_reconcile
from imcore import services
from imcore.models import Conversation, User

ADMIN = ("admin", "admin")
DEMO_PASSWORD = "imcore-demo-pass"
DEMO_USERS = ("alice", "bob", "carol")
DEMO_MESSAGES = [
    ("alice", "direct", "Hi Bob, is the storm test green?"),
    ("bob", "direct", "Green. 5,000 members, no drift."),
    ("carol", "group", "Welcome to the demo group."),
    ("alice", "group", "Try marking this read from another device."),
    ("bob", "group", "And mute the group to see the badge drop."),
]


class Command(BaseCommand):
    help = "Create a demo admin login, demo users, a direct and a group conversation."

    def handle(self, *args, **options):
        if not User.objects.filter(username=ADMIN[0]).exists():
            User.objects.create_superuser(ADMIN[0], "admin@example.com", ADMIN[1])
        users = {}
        for name in DEMO_USERS:
            user = User.objects.filter(username=name).first()
            if user is None:
                user = User.objects.create_user(name, password=DEMO_PASSWORD)
            users[name] = user
        alice, bob, carol = (users[n] for n in DEMO_USERS)
        direct, _ = services.conversation_create(
            creator=alice, kind=Conversation.Kind.DIRECT, member_ids=[bob.pk]
        )
        group = Conversation.objects.filter(kind="group", title="Demo team").first()
        if group is None:
            group, _ = services.conversation_create(
                creator=carol,
                kind=Conversation.Kind.GROUP,
                member_ids=[alice.pk, bob.pk],
                title="Demo team",
            )
        for i, (sender, where, body) in enumerate(DEMO_MESSAGES, start=1):
            services.message_send(
                sender=users[sender],
                conversation=direct if where == "direct" else group,
                body=body,
                client_msg_id=f"demo-{i}",
            )
        counters_reconcile(user_ids=[u.pk for u in users.values()])
        self.stdout.write(
            f"Demo admin login:  {ADMIN[0]} / {ADMIN[1]}\n"
            f"Demo users:        {', '.join(DEMO_USERS)} (password {DEMO_PASSWORD})\n"
            f"Conversations:     direct #{direct.pk} (alice, bob), "
            f"group #{group.pk} 'Demo team' (alice, bob, carol)"
        )
