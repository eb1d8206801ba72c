"""Admin of the messaging domain. Rows whose editing would break an invariant (seqs, read
pointers, memberships) are read-only here: change them through the API, whose services keep
PostgreSQL and the Redis counters in step."""

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import Count, Q

from counters.selectors import counters_peek
from counters.services import counters_reconcile
from offline.selectors import devices_last_seen, devices_sync_state

from . import services
from .models import Conversation, Device, Membership, Message, User


def report_reconcile(modeladmin, request, user_ids) -> None:
    report = counters_reconcile(user_ids=sorted(set(user_ids)))
    modeladmin.message_user(request, f"Counters rebuilt from PostgreSQL: {report.summary()}.")
    for diff in report.diffs[:20]:
        parts = []
        if diff.badge:
            parts.append(f"badge {diff.badge[0]} → {diff.badge[1]}")
        parts += [
            f"conversation {cid}: {was} → {should}"
            for cid, (was, should) in list(diff.conversations.items())[:10]
        ]
        parts += [
            f"conversation {cid} mentions: {was} → {should}"
            for cid, (was, should) in list(diff.mentions.items())[:10]
        ]
        modeladmin.message_user(
            request, f"user {diff.user_id} differed: {', '.join(parts)}", level=messages.WARNING
        )


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    actions = ["rebuild_counters"]

    @admin.action(description="Rebuild unread counters from PostgreSQL and report differences")
    def rebuild_counters(self, request, queryset):
        report_reconcile(self, request, queryset.values_list("pk", flat=True))


class MembershipInline(admin.TabularInline):
    model = Membership
    fields = ("user", "last_read_seq", "muted", "joined_at", "left_at", "rev")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "kind",
        "title",
        "member_count",
        "mode",
        "last_seq",
        "created_by",
        "created_at",
    )
    list_filter = ("kind", "mode")
    search_fields = ("title",)
    readonly_fields = (
        "kind",
        "direct_key",
        "created_by",
        "created_at",
        "last_seq",
        "mode",
        "mode_gen",
    )
    inlines = [MembershipInline]
    actions = ["convert_to_channel", "convert_to_aggregate"]

    @admin.action(description="Convert to channel mode (large-group counting, in a task)")
    def convert_to_channel(self, request, queryset):
        self._convert(request, queryset, Conversation.Mode.CHANNEL)

    @admin.action(description="Convert to aggregate mode (per-member counting, in a task)")
    def convert_to_aggregate(self, request, queryset):
        self._convert(request, queryset, Conversation.Mode.AGGREGATE)

    def _convert(self, request, queryset, mode):
        groups = list(queryset.filter(kind=Conversation.Kind.GROUP).values_list("pk", flat=True))
        for pk in groups:
            services.conversation_convert(conversation_id=pk, mode=mode)
        self.message_user(
            request, f"{len(groups)} group(s) will convert to {mode} mode", messages.SUCCESS
        )

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("created_by")
            .annotate(_members=Count("membership", filter=Q(membership__left_at__isnull=True)))
        )

    @admin.display(description="members", ordering="_members")
    def member_count(self, obj):
        return obj._members

    def has_add_permission(self, request):
        return False  # create through the API so members' counters start right

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Membership)
class MembershipAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "user",
        "conversation",
        "last_read_seq",
        "unread_truth",
        "unread_redis",
        "muted",
        "left_at",
    )
    list_filter = ("muted", ("left_at", admin.EmptyFieldListFilter))
    search_fields = ("user__username", "conversation__title")
    list_select_related = ("user", "conversation")
    actions = ["rebuild_counters"]

    @admin.display(description="unread (PostgreSQL)")
    def unread_truth(self, obj):
        if obj.left_at is not None:
            return "-"
        recalled = Message.objects.filter(
            conversation_id=obj.conversation_id, deleted=True, seq__gt=obj.last_read_seq
        ).count()
        return max(obj.conversation.last_seq - obj.last_read_seq - recalled, 0)

    @admin.display(description="unread (Redis)")
    def unread_redis(self, obj):
        counts = counters_peek(user_id=obj.user_id)
        if counts is None:
            return "not loaded"
        return counts.conversations.get(obj.conversation_id, "-")

    @admin.action(description="Rebuild these users' counters from PostgreSQL")
    def rebuild_counters(self, request, queryset):
        report_reconcile(self, request, queryset.values_list("user_id", flat=True))

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("id", "conversation", "seq", "sender", "short_body", "created_at")
    list_select_related = ("conversation", "sender")
    search_fields = ("client_msg_id",)
    list_filter = ("conversation__kind",)

    @admin.display(description="body")
    def short_body(self, obj):
        return obj.body[:80]


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "user",
        "device_id",
        "platform",
        "created_at",
        "last_seen",
        "acked",
        "latest",
        "behind",
    )
    list_filter = ("platform",)
    search_fields = ("user__username", "device_id")
    readonly_fields = list_display[1:]
    exclude = ("token_hash",)

    # Deleting a device here logs it out like the API does: its socket closes, Redis forgets it.
    def delete_model(self, request, obj):
        services.device_logout(device=obj)

    def delete_queryset(self, request, queryset):
        for device in queryset:
            services.device_logout(device=device)

    def get_changelist_instance(self, request):
        changelist = super().get_changelist_instance(request)
        # The sync state of the whole page in two Redis round trips, not two per row.
        rows = list(changelist.result_list)
        states, seen = devices_sync_state(rows), devices_last_seen(rows)
        for device in rows:
            device.sync_state, device.seen = states[device.pk], seen[device.pk]
        return changelist

    @admin.display(description="last seen")
    def last_seen(self, obj):
        # Includes the time not yet flushed to last_seen_at (presence is a delayed write).
        seen = getattr(obj, "seen", None) or devices_last_seen([obj])[obj.pk]
        return seen or "never"

    @staticmethod
    def _state(obj) -> tuple[int, int | None]:
        state = getattr(obj, "sync_state", None)
        return state if state is not None else devices_sync_state([obj])[obj.pk]

    @admin.display(description="acked version")
    def acked(self, obj):
        return self._state(obj)[0]

    @admin.display(description="user's latest version")
    def latest(self, obj):
        latest = self._state(obj)[1]
        return "not in Redis" if latest is None else latest

    @admin.display(description="behind by")
    def behind(self, obj):
        acked, latest = self._state(obj)
        return "—" if latest is None else max(latest - acked, 0)

    def has_add_permission(self, request):
        return False  # devices log in through POST /api/v1/devices
