"""``/ws/v1/sync``: live sync for a connected device.

On connect (device token in ``Authorization: Bearer``, or ``?token=`` for browsers, which
cannot set headers on a WebSocket) the device is marked online and joins its user's group,
then receives its offline package: everything after its acked version, in frames of
``SYNC_WS_FRAME_ENTRIES`` (or the gap snapshot). From then on a poke on the group (a writer
added entries for the user) makes it read the store from the last version it sent.

Every version is sent once and in order, with no gap at the seam: the device joins the group
before reading the package, and every read (package or poke) starts from the last version
sent, under one lock, so entries written while the package goes out arrive right after it.

Channel-mode groups (large groups) write no entries per message. Each socket joins, on the
relay layer (``settings.RELAY_LAYER``, Redis pub/sub), the group of each of its user's
channel-mode conversations (``offline.keys.live_conversation_group``): on connect, when told
its user joined or left one or one converted (``sync.channels`` on the user's group), and on
every periodic refresh. A message there comes as ``{"type": "channel", "conversation_id",
"last_seq", "message"}``, the message read once per server process whatever the number of its
sockets (:class:`_MessageCache`). Sync frames carry ``channels`` as ``/sync`` does: the last
frame of a catch-up lists the channel-mode groups that changed since the socket's previous
listing (all of them on connect since the acked version's time); a lost relay is mended by the
periodic refresh, which lists the groups that changed since the last one.

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
import contextlib
import functools
import json
import logging
import weakref
from collections import OrderedDict
from urllib.parse import parse_qs

from channels.db import DatabaseSyncToAsync
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.utils import await_many_dispatch
from django.conf import settings

from imcore.errors import BadRequest
from imcore.models import Device
from imcore.services import device_authenticate

from . import keys, selectors, services

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


class _MessageCache:
    """The messages relayed lately, rendered once per process (per event loop) and shared by
    all its sockets: ``(conversation id, seq)`` -> the task reading it, the newest ``SIZE``."""

    SIZE = 1024

    def __init__(self):
        self.items: OrderedDict[tuple[int, int], asyncio.Task] = OrderedDict()
        self.reads = 0  # how many were read from PostgreSQL (tests look)

    async def get(self, conversation_id: int, seq: int) -> dict | None:
        key = (conversation_id, seq)
        task = self.items.get(key)
        if task is None:
            self.reads += 1
            task = asyncio.ensure_future(
                in_thread(selectors.channel_message_out)(conversation_id, seq)
            )
            self.items[key] = task
            while len(self.items) > self.SIZE:
                self.items.popitem(last=False)
        try:
            return await asyncio.shield(task)
        except Exception:
            self.items.pop(key, None)  # the next socket tries again
            raise


_caches: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _MessageCache]" = (
    weakref.WeakKeyDictionary()
)


def message_cache() -> _MessageCache:
    loop = asyncio.get_running_loop()
    cache = _caches.get(loop)
    if cache is None:
        cache = _caches[loop] = _MessageCache()
    return cache


class SyncConsumer(AsyncWebsocketConsumer):
    device = None
    heartbeat: asyncio.Task | None = None
    closing = False  # closed by the server: nothing more is sent
    relay_layer = None
    relays: frozenset[int] = frozenset()  # the conversations whose relay groups it is in

    async def __call__(self, scope, receive, send):
        """Channels' ``AsyncConsumer.__call__``, also listening on the relay layer."""
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
        self.relay_layer = get_channel_layer(settings.RELAY_LAYER)
        self.relay_channel = await self.relay_layer.new_channel()
        self.base_send = send
        with contextlib.suppress(StopConsumer):
            await await_many_dispatch(
                [
                    receive,
                    self.channel_receive,
                    functools.partial(self.relay_layer.receive, self.relay_channel),
                ],
                self.dispatch,
            )

    async def connect(self):
        token = _token(self.scope)
        device = await in_thread(_authenticate)(token) if token else None
        await self.accept()
        if device is None:
            await self._refuse(CLOSE_BAD_TOKEN, "a valid device token is required")
            return
        self.device = device
        self.sent: int | None = None  # the last version sent; None: start at the acked one
        self.channels_ms: int | None = None  # when ``channels`` were last listed
        self.lock = asyncio.Lock()
        self.relay_lock = asyncio.Lock()
        self.group = keys.live_group(device.user_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        if not await in_thread(_still_logged_in)(device):  # logged out before the join
            await self._logged_out()
            return
        await in_thread(services.presence_connected)(device=device)
        self.heartbeat = asyncio.create_task(self._keep_online())
        await self._refresh_relays()  # before the listing: nothing falls between the two
        await self._catch_up(channels=True)

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
            await self._refresh_relays()  # in case a sync.channels event was lost
            await self._catch_up(channels=True)  # in case a poke or a relayed message was lost

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
        async with self.relay_lock:
            for cid in self.relays:  # in-process bookkeeping; the last one unsubscribes
                await self.relay_layer.group_discard(
                    keys.live_conversation_group(cid), self.relay_channel
                )
            self.relays = frozenset()

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

    async def sync_channels(self, event):
        """The user joined or left a channel-mode group, or one converted."""
        await self._refresh_relays()
        await self._catch_up(channels=True)

    async def channel_message(self, event):
        """A message in one of the user's channel-mode groups, relayed."""
        cid, seq = event["conversation_id"], event["seq"]
        if self.closing or self.device is None or cid not in self.relays:
            return
        try:
            message = await message_cache().get(cid, seq)
        except Exception:
            logger.warning("could not read relayed message %s/%s", cid, seq, exc_info=True)
            return
        if self.closing:
            return
        frame = {"type": "channel", "conversation_id": cid, "last_seq": seq, "message": message}
        await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def channel_op(self, event):
        """A recall or an edit in one of the user's channel-mode groups, relayed: the message
        as it is now (read fresh; the message cache forgets the old one)."""
        cid, seq = event["conversation_id"], event["seq"]
        if self.closing or self.device is None or cid not in self.relays:
            return
        message_cache().items.pop((cid, seq), None)
        try:
            message = await in_thread(selectors.channel_message_out)(cid, seq)
        except Exception:
            logger.warning("could not read relayed message %s/%s", cid, seq, exc_info=True)
            return
        if self.closing:
            return
        frame = {
            "type": "channel_op",
            "op": event["op"],
            "conversation_id": cid,
            "seq": seq,
            "message": message,
        }
        await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def _refresh_relays(self) -> None:
        """Join the relay groups of the user's channel-mode conversations, leave the others."""
        async with self.relay_lock:
            if self.closing:
                return
            wanted = frozenset(
                await in_thread(selectors.channel_conversation_ids)(self.device.user_id)
            )
            for cid in wanted - self.relays:
                await self.relay_layer.group_add(
                    keys.live_conversation_group(cid), self.relay_channel
                )
            for cid in self.relays - wanted:
                await self.relay_layer.group_discard(
                    keys.live_conversation_group(cid), self.relay_channel
                )
            self.relays = wanted

    async def device_logout(self, event):
        if not self.closing and self.device.pk in event["device_pks"]:
            await self._logged_out()

    async def _logged_out(self) -> None:
        await self._refuse(CLOSE_BAD_TOKEN, "this device was logged out")

    async def _catch_up(self, channels: bool = False) -> None:
        async with self.lock:
            if self.closing:
                return
            frames, self.sent, self.channels_ms = await in_thread(services.sync_catch_up)(
                device=self.device, since=self.sent, channels_ms=self.channels_ms, channels=channels
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
