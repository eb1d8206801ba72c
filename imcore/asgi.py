"""ASGI entry point: HTTP (the Django app: API, admin, /metrics) and the sync WebSocket
``/ws/v1/sync`` on one server (uvicorn in ``make run``)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "imcore.settings")
django_asgi_app = get_asgi_application()  # sets Django up before the consumers are imported

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from offline.consumers import SyncConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([path("ws/v1/sync", SyncConsumer.as_asgi())]),
    }
)
