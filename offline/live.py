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

from channels.layers import get_channel_layer

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


def live_poke(user_ids: list[int]) -> None:
    layer = get_channel_layer()
    if layer is None or not user_ids:
        return

    async def send_all() -> None:
        await asyncio.gather(
            *(layer.group_send(keys.live_group(uid), {"type": "sync.poke"}) for uid in user_ids)
        )

    try:
        asyncio.run_coroutine_threadsafe(send_all(), _background_loop()).result(timeout=30)
    except Exception:  # a poke is an optimization: see the module's docstring
        logger.warning("could not poke %s connected users", len(user_ids), exc_info=True)
