"""The Lua scripts of ``counters/lua/``, registered once per Redis client and called through
typed wrappers that turn sentinel results into exceptions.

redis-py's ``Script`` sends EVALSHA and falls back to loading the script on NOSCRIPT (also
inside pipelines), so a Redis restart needs no special handling here.
"""

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import redis
from redis.commands.core import Script

from . import keys
from .transitions import CountersNotLoaded, CountersNotMember, MembershipRow

LUA_DIR = Path(__file__).with_name("lua")


@cache
def source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


class CounterScripts:
    """The four counter scripts bound to one Redis client."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._inc: Script = client.register_script(source("inc"))
        self._read: Script = client.register_script(source("read"))
        self._member: Script = client.register_script(source("member"))
        self._load: Script = client.register_script(source("load"))

    def inc(self, user_id: int, pairs: Sequence[tuple[int, int]], *, pipe=None):
        """KEYS[1] = counter hash; ARGV = cid, seq, cid, seq, ...; returns the badge change
        (or queues the call on ``pipe``)."""
        args = [v for pair in pairs for v in pair]
        return self._inc(keys=[keys.counters(user_id)], args=args, client=pipe or self.client)

    def read(self, user_id: int, conversation_id: int, read_seq: int, top: int) -> tuple[int, int]:
        unread, badge = self._read(
            keys=[keys.counters(user_id)], args=[conversation_id, read_seq, top]
        )
        if unread == -1:
            raise CountersNotLoaded
        if unread == -2:
            raise CountersNotMember
        return int(unread), int(badge)

    def member(self, user_id: int, row: MembershipRow, *, pipe=None):
        """Returns the badge change (or queues the call on ``pipe``)."""
        result = self._member(
            keys=[keys.counters(user_id)], args=_row_args(row), client=pipe or self.client
        )
        return result if pipe is not None else int(result)

    def load(self, user_id: int, rows: Sequence[MembershipRow]) -> int:
        args = [v for row in rows for v in _row_args(row)]
        return int(self._load(keys=[keys.counters(user_id)], args=args))


def _row_args(row: MembershipRow) -> list[int]:
    return [
        row.conversation_id,
        row.rev,
        int(row.active),
        int(row.muted),
        row.read_seq,
        row.top,
    ]
