"""Live delivery to connected devices: a writer that added entries for a user with a device
online pokes the user's channel-layer group; each connected device then reads the store
from the last version it sent (so it gets every version once, in order, whoever wrote it and
in whatever order the pokes arrive)."""

import asyncio
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from . import keys

logger = logging.getLogger(__name__)


def live_poke(user_ids: list[int]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return

    async def send_all() -> None:
        await asyncio.gather(
            *(layer.group_send(keys.live_group(uid), {"type": "sync.poke"}) for uid in user_ids)
        )

    try:
        async_to_sync(send_all)()
    except Exception:  # a poke is an optimization: the device also catches up on its next read
        logger.warning("could not poke %s connected users", len(user_ids), exc_info=True)
