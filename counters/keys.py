"""Redis key layout of the counters app: the only place that builds counter keys.

Every key of one user carries the hash tag ``{u:<user_id>}`` so that, on Redis Cluster, all of
them live in one slot and each Lua script touches a single slot.

``imc:{u:<user_id>}:ctr`` HASH, everything the counters of one user need:

    badge      sum of ``u:<cid>`` over the user's unmuted conversations
    ready      "1" once the hash was loaded from PostgreSQL; absent means "rebuild before
               answering a read" (Redis was wiped, or the user is new to this Redis)
    u:<cid>    unread count of an active membership; absent = not a member (its t: may
               still move, so that a join applied late counts what came before it)
    t:<cid>    top: highest message seq of the conversation counted so far (only grows)
    r:<cid>    read pointer, the user's last_read_seq (only grows)
    m:<cid>    "1" when the conversation is muted (its unread stays out of the badge)
    v:<cid>    rev of the last membership change applied (join, leave, mute); kept after
               leaving so that an older change arriving late is ignored
    n:<cid>    the user's unread mentions in the conversation: the seqs of the messages that
               mention them (or everyone), ascending, comma separated, only those above
               ``r:<cid>``; absent when there is none. Mentions are rare, so the list is
               short. A seq is added once (present already, or at or below the read pointer:
               nothing), a read drops the seqs it passes, a leave deletes the field. Not part
               of the badge (still counted for muted conversations)

    x:<cid>    the recalled seqs above ``r:<cid>`` (ascending, comma separated, absent when
               none; a recall raises ``t:<cid>`` to its seq, so all are at or below it): the
               unread is ``t - r - len(x)``. Recalls are rare, so the list is short; a read
               drops the seqs it passes. A recalled seq never stays in ``n:<cid>``

    c:<cid>    "1" when the user's counters of the conversation are in **channel form** (a
               large group, ``Conversation.mode``): no ``u:<cid>``, the unread is computed
               when read as ``max(top(c), t) - r`` from the conversation's channel hash
               below, and the stored ``badge`` leaves it out (readers add the unmuted ones)
    g:<cid>    the conversation's mode generation the form was set by (``mode_gen``): a
               membership call carrying an older generation leaves the form as it is

``u = t - r - len(x)`` always, and the seqs of ``n`` and ``x`` are above ``r``; ``t`` and ``r``
only move up, so applying a counter event twice, late or out of order changes nothing (the
message ``seq`` is the idempotency key). Keeping all of
a user's fields in one hash means a wipe or an eviction takes all of them or none.

Per conversation in channel form, with the hash tag ``{c:<cid>}`` (one slot per conversation):

``imc:{c:<cid>}:ch`` HASH ``top`` (the highest seq committed and counted; only grows) and ``ms``
(unix ms of its last change, for ``/sync``'s ``channels``). The only key a plain message in a
channel-mode group writes.

``imc:{c:<cid>}:all`` ZSET of the seqs of its ``mention_all`` messages (score = member = seq),
counted against each reader's pointer; a user's personal mentions stay in ``n:<cid>``.

``imc:{c:<cid>}:rc`` ZSET of the seqs of its recalled messages (score = member = seq), kept in
every mode (O(1) per recall): in channel form each reader's unread is ``max(top, t) - r -
ZCOUNT(rc, (r, +inf))``, and a conversion to the aggregate form folds it into ``x:<cid>``.

``imc:{u:<user_id>}:lock`` STRING, the lock of the ``lock`` strategy (SET NX PX).
"""

PREFIX = "imc"


def user_tag(user_id: int) -> str:
    return f"{{u:{int(user_id)}}}"


def counters(user_id: int) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:ctr"


def conversation_tag(conversation_id: int) -> str:
    return f"{{c:{int(conversation_id)}}}"


def channel(conversation_id: int) -> str:
    return f"{PREFIX}:{conversation_tag(conversation_id)}:ch"


def channel_mentions_all(conversation_id: int) -> str:
    return f"{PREFIX}:{conversation_tag(conversation_id)}:all"


CHANNEL_TOP = "top"
CHANNEL_MS = "ms"


def counters_lock(user_id: int) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:lock"


BADGE = "badge"
READY = "ready"


def unread_field(conversation_id: int | str) -> str:
    return f"u:{conversation_id}"


def top_field(conversation_id: int | str) -> str:
    return f"t:{conversation_id}"


def read_field(conversation_id: int | str) -> str:
    return f"r:{conversation_id}"


def muted_field(conversation_id: int | str) -> str:
    return f"m:{conversation_id}"


def rev_field(conversation_id: int | str) -> str:
    return f"v:{conversation_id}"


def mentions_field(conversation_id: int | str) -> str:
    return f"n:{conversation_id}"


def channel_field(conversation_id: int | str) -> str:
    return f"c:{conversation_id}"


def recalled_field(conversation_id: int | str) -> str:
    return f"x:{conversation_id}"


def channel_recalled(conversation_id: int) -> str:
    return f"{PREFIX}:{conversation_tag(conversation_id)}:rc"


def gen_field(conversation_id: int | str) -> str:
    return f"g:{conversation_id}"
