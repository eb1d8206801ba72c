"""Rebuild unread counters in Redis from PostgreSQL and report what differed."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from counters.services import counters_reconcile


class Command(BaseCommand):
    help = "Recompute Redis unread counters and badges from PostgreSQL (one user or all)."

    def add_arguments(self, parser):
        who = parser.add_mutually_exclusive_group(required=True)
        who.add_argument("--user", help="user id or username")
        who.add_argument("--all", action="store_true", help="every user")

    def handle(self, *args, user=None, all=False, **options):
        user_ids = None
        if user is not None:
            User = get_user_model()
            match = User.objects.filter(username=user).first()
            if match is None and user.isdigit():
                match = User.objects.filter(pk=int(user)).first()
            if match is None:
                raise CommandError(f"no user {user!r}")
            user_ids = [match.pk]
        report = counters_reconcile(user_ids=user_ids)
        for diff in report.diffs:
            if diff.badge:
                self.stdout.write(f"user {diff.user_id}: badge {diff.badge[0]} -> {diff.badge[1]}")
            for cid, (was, should) in diff.conversations.items():
                self.stdout.write(
                    f"user {diff.user_id}: conversation {cid} unread {was} -> {should}"
                )
            for cid, (was, should) in diff.mentions.items():
                self.stdout.write(
                    f"user {diff.user_id}: conversation {cid} mentions {was} -> {should}"
                )
        self.stdout.write(self.style.SUCCESS(report.summary()))
