"""The delivery app keeps its queues in Redis; this model has no table and exists only to give
the pipeline's status page a place in the Django admin."""

from django.db import models


class Pipeline(models.Model):
    class Meta:
        managed = False
        default_permissions = ("view",)
        verbose_name = "aggregation pipeline"
        verbose_name_plural = "aggregation pipeline"

    def __str__(self) -> str:
        return "aggregation pipeline"
