"""Live delivery to connected devices: a writer that added entries for a user with a device
online pokes the user's channel-layer group; each connected device then reads the store
from the last version it sent (so it gets every version once, in order, whoever wrote it and
in whatever order the pokes arrive). A poke that is lost (the layer drops messages past its
capacity) delays a device until the next poke or its connection's periodic catch-up
(``SyncConsumer._keep_online``), never more.

The pokes of one process go out from one event loop on a thread of its own, so the channel
layer's Redis connections are reused (``async_to_sync`` would start a new loop, and new
connections, on every call)."""

import asyncio
import logging
import os
import threading

from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import get_channel_layer
from django.conf import settings

from . import keys

logger = logging.getLogger(__name__)

_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None
_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid():  # a forked child needs its own
            _loop = asyncio.new_event_loop()
            _loop_pid = os.getpid()
            threading.Thread(target=_loop.run_forever, name="live-poke", daemon=True).start()
        return _loop


def _group_send(messages: list[tuple[str, dict]], alias: str = DEFAULT_CHANNEL_LAYER) -> None:
    """Send ``(group, event)`` pairs from the process's poke loop on the layer ``alias``;
    raises what the layer raised (or TimeoutError after 30 s)."""
    layer = get_channel_layer(alias)
    if layer is None or not messages:
        return

    async def send_all() -> None:
        await asyncio.gather(*(layer.group_send(group, event) for group, event in messages))

    asyncio.run_coroutine_threadsafe(send_all(), _background_loop()).result(timeout=30)


def live_poke(user_ids: list[int]) -> None:
    try:
        _group_send([(keys.live_group(uid), {"type": "sync.poke"}) for uid in user_ids])
    except Exception:  # a poke is an optimization: see the module's docstring
        logger.warning("could not poke %s connected users", len(user_ids), exc_info=True)


def live_channel_message(*, conversation_id: int, seq: int) -> None:
    """A message in a channel-mode group: one send to the conversation's group on the relay
    layer (``settings.RELAY_LAYER``, Redis pub/sub: one PUBLISH, whatever the number of
    connected members); each server process passes it to its sockets in the group (its
    members' connected devices). Best effort like a poke: a device that misses it learns the
    message from ``/sync``'s ``channels``."""
    try:
        _group_send(
            [
                (
                    keys.live_conversation_group(conversation_id),
                    {"type": "channel.message", "conversation_id": conversation_id, "seq": seq},
                )
            ],
            settings.RELAY_LAYER,
        )
    except Exception:
        logger.warning("could not relay message %s/%s", conversation_id, seq, exc_info=True)


def live_channel_op(*, conversation_id: int, seq: int, op: str) -> None:
    """A recall or an edit (``op``) in a channel-mode group, relayed like a message: its
    sockets send ``{"type": "channel_op", "op", "conversation_id", "seq", "message"}`` with
    the message as it is now. Best effort: history shows the final state."""
    try:
        _group_send(
            [
                (
                    keys.live_conversation_group(conversation_id),
                    {
                        "type": "channel.op",
                        "conversation_id": conversation_id,
                        "seq": seq,
                        "op": op,
                    },
                )
            ],
            settings.RELAY_LAYER,
        )
    except Exception:
        logger.warning("could not relay %s of %s/%s", op, conversation_id, seq, exc_info=True)


def live_channels_changed(user_ids: list[int]) -> None:
    """These users joined or left a channel-mode group, or one of their groups changed mode:
    their connected sockets read again which conversation groups to relay
    (``SyncConsumer.sync_channels``). A lost event is mended by the sockets' periodic refresh."""
    try:
        _group_send([(keys.live_group(uid), {"type": "sync.channels"}) for uid in user_ids])
    except Exception:
        logger.warning(
            "could not tell %s users to refresh their relays", len(user_ids), exc_info=True
        )


def live_logout(*, user_id: int, device_pks: list[int]) -> None:
    """These devices of the user were logged out: their open sockets close with 4401. The
    event goes to the user's group; each socket checks whether it is one of them. A lost event
    (layer down or full) delays the close until the socket's next periodic check
    (``SyncConsumer._keep_online``), at most a third of ``PRESENCE_TTL_S``."""
    try:
        _group_send(
            [(keys.live_group(user_id), {"type": "device.logout", "device_pks": device_pks})]
        )
    except Exception:
        logger.warning(
            "could not tell the sockets of user %s about a logout", user_id, exc_info=True
        )
