from django.apps import AppConfig


class ImcoreConfig(AppConfig):
    name = "imcore"
    verbose_name = "Messaging"
