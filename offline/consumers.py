"""``/ws/v1/sync``: live sync for a connected device.

On connect (device token in ``Authorization: Bearer``, or ``?token=`` for browsers, which
cannot set headers on a WebSocket) the device is marked online and joins its user's group,
then receives its offline package: everything after its acked version, in frames of
``SYNC_WS_FRAME_ENTRIES`` (or the gap snapshot). From then on a poke on the group (a writer
added entries for the user) makes it read the store from the last version it sent.

Every version is sent once and in order, with no gap at the seam: the device joins the group
before reading the package, and every read (package or poke) starts from the last version
sent, under one lock, so entries written while the package goes out arrive right after it.

Frames from the client: ``{"type": "ack", "version": V}`` (cumulative, like the HTTP ack;
answered ``{"type": "acked", "acked_version": N}``) and ``{"type": "ping"}`` (answered
``pong``; also catches up on anything a lost poke missed). Presence needs no frames from the
client: see ``_keep_online``. Frames to
the client: ``{"type": "sync", "entries": [...], "latest_version", "has_more", "gap",
"snapshot"?}``. Close codes: 4401 missing or bad token, or the device was logged out (or
logged in again, which replaces its token) while connected; 4400 a bad frame (not JSON, an
unknown type, an invalid or future version); nothing changes on either.

A logout closes the device's socket at once: the logout service sends ``device.logout`` to the
user's group after its commit. The socket checks again that its token is still valid after it
joined the group (a logout committed between the token check and the join sent its event
before the socket could hear it) and on every periodic refresh (in case the event was lost).
"""

import asyncio
import json
import logging
from urllib.parse import parse_qs

from channels.db import DatabaseSyncToAsync
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from imcore.errors import BadRequest
from imcore.models import Device
from imcore.services import device_authenticate

from . import keys, services

logger = logging.getLogger(__name__)


def in_thread(fn):
    """Run blocking service code in the thread pool, connections closed around it as Channels'
    ``database_sync_to_async`` does, but not all on one thread (its default): a poke to a
    thousand connected devices then reads the store for many of them at once."""
    return DatabaseSyncToAsync(fn, thread_sensitive=False)


CLOSE_BAD_TOKEN = 4401
CLOSE_BAD_FRAME = 4400
BIGINT_MAX = 2**63 - 1


def _token(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return tokens[0] if tokens else None


def _authenticate(token: str):
    device = device_authenticate(token=token)
    return device if device is not None and device.user.is_active else None


def _still_logged_in(device) -> bool:
    """The device's row still exists with the token the socket authenticated with."""
    return Device.objects.filter(
        pk=device.pk, token_hash=device.token_hash, user__is_active=True
    ).exists()


class SyncConsumer(AsyncWebsocketConsumer):
    device = None
    heartbeat: asyncio.Task | None = None
    closing = False  # closed by the server: nothing more is sent

    async def connect(self):
        token = _token(self.scope)
        device = await in_thread(_authenticate)(token) if token else None
        await self.accept()
        if device is None:
            await self._refuse(CLOSE_BAD_TOKEN, "a valid device token is required")
            return
        self.device = device
        self.sent: int | None = None  # the last version sent; None: start at the acked one
        self.lock = asyncio.Lock()
        self.group = keys.live_group(device.user_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        if not await in_thread(_still_logged_in)(device):  # logged out before the join
            await self._logged_out()
            return
        await in_thread(services.presence_connected)(device=device)
        self.heartbeat = asyncio.create_task(self._keep_online())
        await self._catch_up()

    async def _keep_online(self) -> None:
        """Presence lives while the connection does: the server refreshes it every third of
        ``PRESENCE_TTL_S`` (and catches up then, in case a poke was lost); the ASGI server's
        WebSocket pings (uvicorn ``--ws-ping-interval``
        and ``--ws-ping-timeout``, a third of the TTL each) close a connection whose client
        stopped answering, and a server process that dies stops refreshing: either way the
        device drops out within the TTL."""
        while True:
            await asyncio.sleep(settings.PRESENCE_TTL_S / 3)
            if not await in_thread(_still_logged_in)(self.device):  # a logout event was lost
                await self._logged_out()
                return
            await in_thread(services.presence_connected)(device=self.device)
            await self._catch_up()  # in case a poke was lost

    async def disconnect(self, code):
        if self.device is None:
            return
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        await in_thread(services.presence_disconnected)(device=self.device)
        try:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        except Exception:  # the group forgets a dead channel by itself (group expiry)
            logger.warning("group_discard failed for device %s", self.device.pk, exc_info=True)

    async def receive(self, text_data=None, bytes_data=None):
        if self.device is None or self.closing:
            return
        try:
            frame = json.loads(text_data if text_data is not None else bytes_data)
        except (TypeError, ValueError):
            await self._refuse(CLOSE_BAD_FRAME, "frames are JSON objects")
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "ping" and set(frame) == {"type"}:
            await in_thread(services.presence_connected)(device=self.device)
            await self.send(text_data='{"type":"pong"}')
            await self._catch_up()
        elif kind == "ack" and set(frame) == {"type", "version"} and _version(frame["version"]):
            try:
                acked = await in_thread(services.sync_ack)(
                    device=self.device, version=frame["version"]
                )
            except BadRequest as exc:
                await self._refuse(CLOSE_BAD_FRAME, exc.message)
                return
            await self.send(text_data=json.dumps({"type": "acked", "acked_version": acked}))
        else:
            await self._refuse(
                CLOSE_BAD_FRAME,
                'unknown frame: send {"type": "ack", "version": <int>} or {"type": "ping"}',
            )

    async def sync_poke(self, event):
        await self._catch_up()

    async def device_logout(self, event):
        if not self.closing and self.device.pk in event["device_pks"]:
            await self._logged_out()

    async def _logged_out(self) -> None:
        await self._refuse(CLOSE_BAD_TOKEN, "this device was logged out")

    async def _catch_up(self) -> None:
        async with self.lock:
            if self.closing:
                return
            frames, self.sent = await in_thread(services.sync_catch_up)(
                device=self.device, since=self.sent
            )
            for frame in frames:
                if self.closing:  # closed while the store was read
                    return
                await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def _refuse(self, code: int, message: str) -> None:
        self.closing = True
        await self.send(text_data=json.dumps({"type": "error", "code": code, "message": message}))
        await self.close(code=code)


def _version(value) -> bool:
    return type(value) is int and 0 <= value <= BIGINT_MAX
