from django.apps import AppConfig
from django.db.models.signals import post_save, pre_delete


class ImcoreConfig(AppConfig):
    name = "imcore"
    verbose_name = "Messaging"

    def ready(self):
        from .models import User

        post_save.connect(_user_saved, sender=User, dispatch_uid="imcore.user_saved")
        pre_delete.connect(_user_deleted, sender=User, dispatch_uid="imcore.user_deleted")


def _user_saved(sender, instance, **kwargs):
    """A user saved inactive (deactivated, in the admin or anywhere): their tokens stop
    working at once, not when the token cache expires."""
    if not instance.is_active:
        from .services import user_tokens_revoke

        user_tokens_revoke(user_id=instance.pk)


def _user_deleted(sender, instance, **kwargs):
    from .services import user_tokens_revoke

    user_tokens_revoke(user_id=instance.pk)
