from django.conf import settings
from django.db import models


class VersionBound(models.Model):
    """The durable upper bound of a user's sync versions (WeChat's seqsvr "max_seq"): Redis
    hands versions out up to it, and PostgreSQL is raised a step before Redis goes past it.
    After Redis loses everything, versions continue above it, so none repeats."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, primary_key=True
    )
    bound = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = "version bound"

    def __str__(self) -> str:
        return f"user {self.user_id}: versions up to {self.bound}"
