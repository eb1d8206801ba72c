from django.contrib import admin

from .models import VersionBound
from .store import peek_latest


@admin.register(VersionBound)
class VersionBoundAdmin(admin.ModelAdmin):
    """Read-only: the durable upper bound of each user's versions beside the latest version
    Redis handed out (never above the bound)."""

    list_display = ("user", "bound", "latest")
    search_fields = ("user__username",)
    readonly_fields = ("user", "bound", "latest")

    @admin.display(description="latest version (Redis)")
    def latest(self, obj):
        latest = peek_latest([obj.user_id])[obj.user_id]
        return "not in Redis" if latest is None else latest

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
