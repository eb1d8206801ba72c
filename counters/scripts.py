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
from .redis import ScriptCall, register_script, run_script
from .transitions import CountersNotLoaded, CountersNotMember, MembershipRow

LUA_DIR = Path(__file__).with_name("lua")


@cache
def source(name: str) -> str:
    """A script's text, after the helpers every counter script shares (``_shared.lua``)."""
    return (LUA_DIR / "_shared.lua").read_text() + (LUA_DIR / f"{name}.lua").read_text()


def seq_arg(pair: Sequence) -> int | str:
    """The ``inc`` argument of ``(conversation id, seq)`` or ``(conversation id, seq, mention
    seqs)``: the seq, followed by ``:`` and the mention seqs when there are any."""
    if len(pair) > 2 and pair[2]:
        return f"{int(pair[1])}:{','.join(str(int(s)) for s in pair[2])}"
    return pair[1]


class CounterScripts:
    """The counter scripts bound to one Redis client."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._inc: Script = register_script(client, source("inc"))
        self._read: Script = register_script(client, source("read"))
        self._member: Script = register_script(client, source("member"))
        self._load: Script = register_script(client, source("load"))
        self._channel: Script = register_script(client, (LUA_DIR / "channel.lua").read_text())
        self._recall: Script = register_script(client, source("recall"))
        self._recall_channel: Script = register_script(
            client, (LUA_DIR / "recall_channel.lua").read_text()
        )

    def recall(self, user_id: int, conversation_id: int, seq: int, *, pipe=None):
        """KEYS[1] = counter hash; ARGV = cid, seq; returns the badge change (or queues the
        call on ``pipe``)."""
        return run_script(
            self._recall,
            keys=[keys.counters(user_id)],
            args=[conversation_id, seq],
            client=pipe or self.client,
        )

    def recall_channel(self, conversation_id: int, seq: int, *, channel: bool, pipe=None):
        """Record a recalled seq in the conversation's channel keys (see
        ``recall_channel.lua``); returns 1 when it was new (or queues the call on ``pipe``)."""
        return run_script(
            self._recall_channel,
            keys=[
                keys.channel(conversation_id),
                keys.channel_mentions_all(conversation_id),
                keys.channel_recalled(conversation_id),
            ],
            args=[seq, int(bool(channel))],
            client=pipe or self.client,
        )

    def inc(self, user_id: int, pairs: Sequence[Sequence], *, pipe=None):
        """KEYS[1] = counter hash; ARGV = cid, seq, cid, seq, ... (``pairs`` items are
        ``(cid, seq)`` or ``(cid, seq, mention seqs)``); returns the badge change (or queues
        the call on ``pipe``)."""
        args = [v for pair in pairs for v in (pair[0], seq_arg(pair))]
        return run_script(
            self._inc, keys=[keys.counters(user_id)], args=args, client=pipe or self.client
        )

    def channel(self, conversation_id: int, seq: int, *, mention_all=False, known_top=0, pipe=None):
        """Raise a channel-form conversation's top to ``seq`` (and record a ``mention_all``
        seq); returns the top (or queues the call on ``pipe``)."""
        return run_script(
            self._channel,
            keys=[keys.channel(conversation_id), keys.channel_mentions_all(conversation_id)],
            args=[seq, int(bool(mention_all)), known_top],
            client=pipe or self.client,
        )

    def inc_call(self, user_id: int, pairs: Sequence[Sequence]) -> ScriptCall:
        """:meth:`inc`, to be sent with other calls (:func:`counters.redis.scripts_call`)."""
        args = [v for pair in pairs for v in (pair[0], seq_arg(pair))]
        return ScriptCall(self._inc, [keys.counters(user_id)], args)

    def channel_call(self, conversation_id: int, seq: int, *, mention_all=False) -> ScriptCall:
        """:meth:`channel`, to be sent with other calls."""
        return ScriptCall(
            self._channel,
            [keys.channel(conversation_id), keys.channel_mentions_all(conversation_id)],
            [seq, int(bool(mention_all)), 0],
        )

    def read_call(self, user_id: int, conversation_id: int, read_seq: int, top: int) -> ScriptCall:
        """:meth:`read`, to be sent with other calls (:meth:`read_result` reads its reply)."""
        return ScriptCall(self._read, [keys.counters(user_id)], [conversation_id, read_seq, top])

    def read(self, user_id: int, conversation_id: int, read_seq: int, top: int, *, pipe=None):
        """Returns ``(unread, badge)`` (or queues the call on ``pipe``; :meth:`read_result`
        reads its reply)."""
        reply = run_script(
            self._read,
            keys=[keys.counters(user_id)],
            args=[conversation_id, read_seq, top],
            client=pipe or self.client,
        )
        return reply if pipe is not None else self.read_result(reply)

    @staticmethod
    def read_result(reply) -> tuple[int, int]:
        unread, badge = reply
        if unread == -1:
            raise CountersNotLoaded
        if unread == -2:
            raise CountersNotMember
        return int(unread), int(badge)

    def member(self, user_id: int, row: MembershipRow, *, pipe=None):
        """Returns the badge change (or queues the call on ``pipe``)."""
        args = [
            *_row_args(row)[:6],
            row.gen,
            _form(row),
            ",".join(map(str, row.mentions)),
            ",".join(map(str, row.recalled)),
        ]
        result = run_script(
            self._member, keys=[keys.counters(user_id)], args=args, client=pipe or self.client
        )
        return result if pipe is not None else int(result)

    def load(self, user_id: int, rows: Sequence[MembershipRow]) -> int:
        args = [v for row in rows for v in _row_args(row)]
        return int(self._load(keys=[keys.counters(user_id)], args=args))


def _row_args(row: MembershipRow) -> list[int | str]:
    return [
        row.conversation_id,
        row.rev,
        int(row.active),
        int(row.muted),
        row.read_seq,
        row.top,
        ",".join(str(s) for s in row.mentions),
        row.gen,
        _form(row),
        ",".join(str(s) for s in row.recalled),
    ]


def _form(row: MembershipRow) -> str:
    return "c" if row.channel else "a"
