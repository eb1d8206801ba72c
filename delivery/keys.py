"""Redis key layout of the delivery app: the queues of the aggregation pipeline, its metrics
and the test failpoints. The strings are the ones the counters app used before the move, so
events queued by an older process are still read.

``imc:{cq:<shard>}:stream``  STREAM of message events ``c=<conversation id> s=<seq>`` (and
                             ``u=<sender> m=<ids> a=1`` for mentions, see delivery.mentions); read
                             by the consumer group ``agg`` (one consumer, ``agg``: the shard
                             lock lets one aggregator work a shard at a time, and it owns the
                             pending entries a dead predecessor left unacknowledged)
``imc:{cq:<shard>}:lock``    STRING the shard's aggregator lock (SET NX PX)
``imc:{cq:<shard>}:flush``   STRING set while an aggregate task for the shard is requested
``imc:metrics:flushes``      LIST   recent flushes (JSON), newest first
``imc:metrics:totals``       HASH   running totals of the pipeline
``imc:failpoint:<name>``     STRING an armed test failpoint (only with COUNTERS_FAILPOINTS)
``imc:failpoint:<name>:pause`` STRING milliseconds every pass of that failpoint waits (tests)

A shard's keys share the hash tag ``{cq:<shard>}``, so on Redis Cluster each shard's script
calls touch one slot.
"""

from counters.keys import PREFIX

GROUP = "agg"
CONSUMER = "agg"


def shard_tag(shard: int) -> str:
    return f"{{cq:{int(shard)}}}"


def shard_stream(shard: int) -> str:
    return f"{PREFIX}:{shard_tag(shard)}:stream"


def shard_lock(shard: int) -> str:
    return f"{PREFIX}:{shard_tag(shard)}:lock"


def shard_flush_flag(shard: int) -> str:
    return f"{PREFIX}:{shard_tag(shard)}:flush"


# unix ms up to which the channel-mode groups' badge pushes were scheduled
CHANNEL_BADGES_SINCE = f"{PREFIX}:channels:badges-since"

METRICS_FLUSHES = f"{PREFIX}:metrics:flushes"
METRICS_TOTALS = f"{PREFIX}:metrics:totals"


def failpoint(name: str) -> str:
    return f"{PREFIX}:failpoint:{name}"


def failpoint_pause(name: str) -> str:
    return f"{PREFIX}:failpoint:{name}:pause"
