"""The Redis client of the hot state (one connection pool per process): a plain ``Redis`` on
``settings.REDIS_URL``, or a ``RedisCluster`` when ``settings.REDIS_CLUSTER_NODES`` is set.

Every key carries a hash tag (``{u:<id>}``, ``{c:<cid>}``, ``{cq:<shard>}``, ``{push}``,
``{acks}``), every Lua script and every MULTI touches the keys of one tag, so on a cluster each
runs on one node; non-transactional pipelines that span users are split by redis-py into one
round trip per node."""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import redis
from django.conf import settings
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisClusterException
from redis.retry import Retry

# What a call to the store raises when it cannot be served: redis-py's errors, and on a cluster
# the client's own (a slot no master covers while a failover is under way).
STORE_ERRORS = (redis.RedisError, RedisClusterException)


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, decode_responses=True, health_check_interval=30, redis_connect_func=_on_connect
    )


# How many connections this process has opened to a (non-cluster) Redis: a restarted Redis is
# reached only over new ones, so its run_id, once read, holds while this count is unchanged.
_connects = [0]
_run_ids: dict[redis.Redis, tuple[int, str]] = {}  # per client: (_connects when read, run_id)


def _on_connect(connection) -> None:
    connection.on_connect()
    _connects[0] += 1


def _keys_locally(client):
    """redis-py finds the keys of a command with movable keys (EVALSHA, XREADGROUP) by asking
    the cluster's *default node* (COMMAND GETKEYS), so once that node is dead every script
    call fails, even after its replica took over. EVAL/EVALSHA keys are read from the call
    itself here (``numkeys``), and a dead default node is replaced before a second try."""
    original = client._get_command_keys

    def command_keys(*args):
        if args and str(args[0]).upper() in ("EVALSHA", "EVAL"):
            return list(args[3 : 3 + int(args[2])])
        try:
            return original(*args)
        except (redis.ConnectionError, redis.TimeoutError):
            client.replace_default_node()
            return original(*args)

    client._get_command_keys = command_keys
    return client


class _Cluster(RedisCluster):
    def pipeline(self, transaction=None, shard_hint=None):
        return _keys_locally(super().pipeline(transaction, shard_hint))


@cache
def _cluster(nodes: tuple[str, ...]) -> RedisCluster:
    startup = [ClusterNode(*n.rsplit(":", 1)) for n in nodes]
    return _keys_locally(
        _Cluster(
            startup_nodes=startup,
            decode_responses=True,
            health_check_interval=30,
            socket_timeout=5,
            socket_connect_timeout=2,
            # A dead master: give up after two tries so the API answers 503 at once rather than
            # hanging for the failover (the client finds the new master on a later request).
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            # While a master is down (before its replica takes over) the others keep serving.
            require_full_coverage=False,
        )
    )


def is_cluster() -> bool:
    return bool(settings.REDIS_CLUSTER_NODES)


def store_id() -> str:
    """What identifies the store the client talks to (cache keys of per-client objects)."""
    if is_cluster():
        return "cluster:" + ",".join(settings.REDIS_CLUSTER_NODES)
    return settings.REDIS_URL


def get_redis() -> redis.Redis:
    """The client of the hot state. redis-py's pools notice a fork and reconnect."""
    if is_cluster():
        return _cluster(tuple(settings.REDIS_CLUSTER_NODES))
    return _client(settings.REDIS_URL)


def run_ids(key_list: Sequence[str]) -> list[str]:
    """The run_id of the Redis process holding each key, in order (one INFO per node). On a
    cluster each master has its own: a failover or a restart of the master that holds a user
    changes the run_id of that user's keys only."""
    client = get_redis()
    if not isinstance(client, RedisCluster):
        # Asked once (an INFO: a round trip and 4 kB to parse, on every offline write before)
        # and kept until this process opens a connection again. The count is taken before the
        # INFO, so a reconnection during it means asking again next time.
        seen, rid = _run_ids.get(client, (-1, ""))
        now = _connects[0]
        if seen != now:
            rid = client.info("server")["run_id"]
            _run_ids[client] = (now, rid)
        return [rid] * len(key_list)
    nodes = {k: client.get_node_from_key(k) for k in key_list}
    by_name = {}
    for node in {n.name: n for n in nodes.values()}.values():
        by_name[node.name] = client.info("server", target_nodes=node)["run_id"]
    return [by_name[nodes[k].name] for k in key_list]


@dataclass(frozen=True)
class ScriptCall:
    """One call of a registered Lua script, to be sent with others (:func:`scripts_call`)."""

    script: Script
    keys: Sequence[str]
    args: Sequence


def scripts_call(calls: Sequence[ScriptCall], client: redis.Redis | None = None) -> list:
    """Run script calls in one round trip: one pipeline (no MULTI) of EVALSHA. redis-py's own
    pipelined ``Script`` asks ``SCRIPT EXISTS`` first, a round trip more every time; here a
    script the server lacks (after a restart, a flush or a failover) answers NOSCRIPT, which
    means that call did not run: those scripts are loaded (on every master of a cluster) and
    just those calls sent again. Returns the results in order; the first error is raised after
    every call has run. On Redis Cluster a pipeline is split by node, one round trip per node
    its keys live on."""
    client = client or get_redis()
    results = _evalsha_all(client, calls)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        for script in {id(calls[i].script): calls[i].script for i in missing}.values():
            script.sha = client.script_load(script.script)
        again = _evalsha_all(client, [calls[i] for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def _evalsha_all(client: redis.Redis, calls: Sequence[ScriptCall]) -> list:
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
    return pipe.execute(raise_on_error=False)


def execute(pipe) -> list:
    """``pipe.execute()`` for a pipeline that mixes script calls (queued by :func:`run_script`
    as plain EVALSHA) with plain commands. redis-py's own pipelined ``Script`` asks ``SCRIPT
    EXISTS`` before every execution, a round trip more each time (and a cluster pipeline does
    not load scripts at all). Here a master that lacks a script (after a restart, a flush or a
    failover) answers NOSCRIPT, which means that call ran nothing: the scripts are loaded (on
    every master) and every command from the first such call on is sent again, in order, but
    the script calls that did run. So the plain commands queued after a script call must be
    reads or idempotent writes (they are: an ``HGETALL`` of what the script wrote). The first
    error is raised after every call has run."""
    if getattr(pipe, "transaction", False) and not isinstance(pipe, RedisCluster):
        return pipe.execute()  # a MULTI: redis-py loads its scripts before it
    stack = _queue(pipe)
    results = pipe.execute(raise_on_error=False)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        client = get_redis()
        for sha in {stack[i][0][1] for i in missing}:
            source = _SOURCES.get(sha)
            if source is None:
                raise results[missing[0]]
            client.script_load(source)  # on a cluster, on every master
        redo = [
            i
            for i in range(missing[0], len(stack))
            if i in missing or str(stack[i][0][0]).upper() != "EVALSHA"
        ]
        again = client.pipeline(transaction=False)
        for i in redo:
            again.execute_command(*stack[i][0], **stack[i][1])
        for i, result in zip(redo, again.execute(raise_on_error=False), strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def _queue(pipe) -> list[tuple[tuple, dict]]:
    """The commands queued on a pipeline, ``(args, options)`` each, before it runs."""
    if isinstance(pipe, ClusterPipeline):
        return [(c.args, c.options) for c in pipe._execution_strategy.command_queue]
    return list(pipe.command_stack)


def run_script(script: Script, *, keys: Sequence[str], args: Sequence, client=None):
    """``script(keys=..., args=..., client=...)``; on a non-transactional pipeline (of a single
    Redis or a cluster) it is queued as a plain EVALSHA, routed on a cluster by its keys' slot,
    and :func:`execute` answers a NOSCRIPT."""
    if isinstance(client, ClusterPipeline) or (
        isinstance(client, redis.client.Pipeline) and not client.transaction
    ):
        return client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    return script(keys=keys, args=args, client=client)


_SOURCES: dict[str, str] = {}


def register_script(client: redis.Redis, source: str) -> Script:
    """``client.register_script``, remembered by SHA so :func:`execute` can load it."""
    script = client.register_script(source)
    _SOURCES[script.sha] = source
    return script
