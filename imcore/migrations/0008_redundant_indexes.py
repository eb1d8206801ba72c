"""Drop the indexes the unique constraints already cover (issue 14): every send wrote entries
into ``imcore_message``'s foreign-key indexes that no query needs. Only the indexes go; the
foreign keys stay as they are (Django's own AlterField would drop and re-validate them, a scan
of the whole table under a lock)."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

DROPPED = {  # index: its columns, to build it again on the way back
    "imcore_membership_user_id_8a6cc75e": "imcore_membership (user_id)",
    "membership_user_idx": "imcore_membership (user_id)",
    "imcore_message_conversation_id_cffe3631": "imcore_message (conversation_id)",
    "imcore_message_sender_id_daf47441": "imcore_message (sender_id)",
}


FOREIGN_KEYS = [  # (model, field, on_delete, to): the same keys, without an index of their own
    ("membership", "user", django.db.models.deletion.CASCADE, settings.AUTH_USER_MODEL),
    ("message", "conversation", django.db.models.deletion.CASCADE, "imcore.conversation"),
    ("message", "sender", django.db.models.deletion.PROTECT, settings.AUTH_USER_MODEL),
]


class Migration(migrations.Migration):
    dependencies = [
        ("imcore", "0007_message_recall_edit"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{name}"',
                    reverse_sql=f'CREATE INDEX IF NOT EXISTS "{name}" ON {columns}',
                )
                for name, columns in DROPPED.items()
            ],
            state_operations=[
                migrations.RemoveIndex(model_name="membership", name="membership_user_idx"),
            ]
            + [
                migrations.AlterField(
                    model_name=model,
                    name=name,
                    field=models.ForeignKey(db_index=False, on_delete=on_delete, to=to),
                )
                for model, name, on_delete, to in FOREIGN_KEYS
            ],
        )
    ]
