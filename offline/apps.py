from django.apps import AppConfig


class OfflineConfig(AppConfig):
    """Multi-device sync: versions, offline store, pull and ack (filled by the sync issue)."""

    name = "offline"
    verbose_name = "Offline sync"
