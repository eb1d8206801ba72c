"""Redis key layout of the offline app: the only place that builds sync keys.

A user's sync keys carry the same hash tag as their counters (``{u:<user_id>}``), so every
script touches one Redis Cluster slot.

``imc:{u:<id>}:sync`` HASH, the user's version state and the watermarks that make every
write idempotent:

    cur        VERSION-LATEST: the last version handed out
    bound      the upper bound stored in PostgreSQL (``offline_versionbound``): versions are
               only handed out up to it; past it PostgreSQL is raised first
    floor      versions <= floor are not (all) held any more: a device whose ``since`` is
               below it gets the gap snapshot
    rid        run_id of the Redis process that loaded the hash; another run_id means Redis
               restarted (maybe from an older snapshot), so the hash is reloaded
    y:<cid>    highest message seq of the conversation recorded in the log
    q:<cid>    highest read seq recorded (``read`` entries)
    v:<cid>    highest membership rev recorded (``join``/``leave``/``mute`` entries)

``imc:{u:<id>}:log`` ZSET, the offline store: score = version, member =
``<version>|<unix ms>|<type>|<conversation id>|<arg>`` (types ``m`` message (arg = seq),
``r`` read (seq), ``j`` join (JSON), ``l`` leave, ``u`` mute ("1"/"0")). Messages are kept
as references and read from PostgreSQL at pull time, so an entry costs ~40 bytes whatever the
message's size.

``imc:{u:<id>}:pkg:<device pk>`` ZSET, a device's prepared package (score = version, member =
the entry's JSON), written by the ``offline.prepare_device`` task; expires.
``imc:{u:<id>}:snap:<device pk>`` STRING, a device's prepared gap snapshot (JSON); expires.

``imc:{u:<id>}:online`` ZSET presence: device pk -> unix ms its presence expires (refreshed by
every frame of its WebSocket; a connection that dies silently drops out when its time passes).

``imc:{push}:due`` ZSET device pk -> unix ms its push is due; ``imc:{push}:kind`` HASH device
pk -> "alert" or "silent"; ``imc:{push}:last`` HASH device pk -> unix ms of its last push.

``imc:{acks}:pending`` HASH device pk -> highest version acked since the last flush.
``imc:{acks}:inflight`` HASH the batch being written to PostgreSQL (kept until committed).
``imc:{acks}:flush`` STRING set while an ack flush is requested.
``imc:{acks}:lock`` STRING held by the one flusher writing a batch.
``imc:{acks}:seen`` / ``imc:{acks}:seen-inflight`` HASH device pk -> unix ms it was last
seen, written to ``last_seen_at`` by the same flush (presence costs no write per request).
"""

from counters.keys import PREFIX, user_tag


def state(user_id: int) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:sync"


def log(user_id: int) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:log"


def package(user_id: int, device_pk: int) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:pkg:{int(device_pk)}"


def snapshot(user_id: int, device_pk: int) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:snap:{int(device_pk)}"


def online(user_id: int) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:online"


def live_group(user_id: int) -> str:
    """The channel-layer group of a user's connected devices (not a Redis key of ours)."""
    return f"sync.u.{int(user_id)}"


def live_conversation_group(conversation_id: int) -> str:
    """The channel-layer group of the connected devices of a channel-mode group's members."""
    return f"sync.c.{int(conversation_id)}"


LOG_PATTERN = f"{PREFIX}:{{u:*}}:log"


def user_of_log(key: str) -> int:
    return int(key.split("{u:", 1)[1].split("}", 1)[0])


ACKS_PENDING = f"{PREFIX}:{{acks}}:pending"
ACKS_INFLIGHT = f"{PREFIX}:{{acks}}:inflight"
ACKS_FLUSH_FLAG = f"{PREFIX}:{{acks}}:flush"
ACKS_FLUSH_LOCK = f"{PREFIX}:{{acks}}:lock"
SEEN_PENDING = f"{PREFIX}:{{acks}}:seen"
SEEN_INFLIGHT = f"{PREFIX}:{{acks}}:seen-inflight"
PUSH_DUE = f"{PREFIX}:{{push}}:due"
PUSH_KIND = f"{PREFIX}:{{push}}:kind"
PUSH_LAST = f"{PREFIX}:{{push}}:last"
# HASH device pk -> the badge its last push carried (a silent update with the same is skipped)
PUSH_BADGE = f"{PREFIX}:{{push}}:badge"
