"""The admin page of the aggregation pipeline: queue lengths, lag, recent flushes, totals."""

from django.conf import settings
from django.contrib import admin
from django.template.response import TemplateResponse

from imcore.admin import ReadOnlyAdmin

from .models import Pipeline
from .selectors import pipeline_status


@admin.register(Pipeline)
class PipelineAdmin(ReadOnlyAdmin):
    def changelist_view(self, request, extra_context=None):
        status = pipeline_status(recent=settings.COUNTERS_RECENT_FLUSHES)
        context = {
            **self.admin_site.each_context(request),
            "title": "Delivery: the aggregation pipeline",
            "opts": self.model._meta,
            "status": status,
            "config": {
                "write path": settings.DELIVERY_WRITE_PATH,
                "strategy": settings.COUNTERS_STRATEGY,
                "shards": settings.COUNTERS_SHARDS,
                "flush threshold (events)": settings.COUNTERS_FLUSH_THRESHOLD,
                "timer interval (s)": settings.COUNTERS_FLUSH_INTERVAL,
                "batch size (events)": settings.COUNTERS_BATCH_SIZE,
                "shard lock TTL (ms)": settings.COUNTERS_SHARD_LOCK_TTL_MS,
            },
        }
        return TemplateResponse(request, "admin/delivery/pipeline.html", context)
