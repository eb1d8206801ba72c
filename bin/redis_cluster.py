"""A local Redis Cluster of ``redis-server`` processes, for the tests
(``IMCORE_TEST_REDIS_CLUSTER``), ``make run-cluster`` and ``make bench-cluster``: N masters
(and R replicas per master) on 127.0.0.1, cluster mode, no persistence, in a temporary
directory of their own.

    python bin/redis_cluster.py start --ports 7101-7103 [--replicas 1] [--dir D]
    python bin/redis_cluster.py stop  --ports 7101-7103

``start`` prints the ``REDIS_CLUSTER_NODES`` value (``127.0.0.1:7101,...``). The servers run
detached; ``stop`` shuts down every port of the range. Standard library and redis-cli only.
"""

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"


def cli(port: int, *args: str, timeout: float = 5) -> str:
    out = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out.stdout


class LocalCluster:
    """``len(ports)`` servers; ``replicas`` per master (masters = len(ports) / (1 + replicas)).
    ``node_timeout_ms`` is ``cluster-node-timeout``: how soon a dead master is failed over.
    ``require_full_coverage`` off: the masters that live keep serving their slots while one is
    down (the API answers 503 only for the keys the dead one held)."""

    def __init__(self, ports, *, replicas: int = 0, node_timeout_ms: int = 1000, dir=None):
        self.ports = list(ports)
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.dir = dir or tempfile.mkdtemp(prefix="imcore-cluster-")
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def nodes(self) -> str:
        """The ``REDIS_CLUSTER_NODES`` value."""
        return ",".join(f"{HOST}:{p}" for p in self.ports)

    def start_server(self, port: int, *, detach: bool = False) -> None:
        args = [
            "redis-server",
            "--bind", HOST, "--port", str(port), "--dir", self.dir,
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "no",
            "--save", "", "--appendonly", "no", "--loglevel", "warning",
            "--logfile", os.path.join(self.dir, f"{port}.log"),
        ]  # fmt: skip
        if detach:
            args += ["--daemonize", "yes", "--pidfile", os.path.join(self.dir, f"{port}.pid")]
            subprocess.run(args, check=True)
        else:
            self.procs[port] = subprocess.Popen(args, start_new_session=True)
        deadline = time.monotonic() + 20
        while "PONG" not in cli(port, "ping"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)

    def start(self, *, detach: bool = False) -> "LocalCluster":
        for port in self.ports:
            if "PONG" in cli(port, "ping"):
                raise RuntimeError(f"port {port} is taken by another Redis")
            self.start_server(port, detach=detach)
        create = ["--cluster", "create", *[f"{HOST}:{p}" for p in self.ports]]
        create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        subprocess.run(
            ["redis-cli", *create], check=True, capture_output=True, text=True, timeout=60
        )
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30) -> None:
        """Every live node sees the cluster as ok and every slot covered."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [cli(p, "cluster", "info") for p in self.live_ports()]
            ok = all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos)
            if ok and (self.replicas == 0 or self._replicas_synced()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not come up: " + " | ".join(infos))
            time.sleep(0.1)

    def wait_failover(self, dead: int, timeout: float = 30) -> None:
        """Every live node sees a replica of the dead master ``dead`` serve its slots."""
        deadline = time.monotonic() + timeout
        while True:
            views = [cli(p, "cluster", "nodes") for p in self.live_ports()]
            if all(self._slots_of(view, dead) == [] for view in views):
                return self.wait_ok(timeout=max(deadline - time.monotonic(), 1))
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from {dead}")
            time.sleep(0.1)

    @staticmethod
    def _slots_of(view: str, port: int) -> list[str]:
        for line in view.splitlines():
            fields = line.split()
            if fields[1].split("@")[0].endswith(f":{port}"):
                return fields[8:]
        return []

    def _replicas_synced(self) -> bool:
        roles = [cli(p, "info", "replication") for p in self.live_ports()]
        replicas = [r for r in roles if "role:slave" in r]
        return len(replicas) >= 1 and all("master_link_status:up" in r for r in replicas)

    def live_ports(self) -> list[int]:
        return [p for p in self.ports if p not in self.procs or self.procs[p].poll() is None]

    def masters(self) -> list[int]:
        return [p for p in self.live_ports() if "role:master" in cli(p, "info", "replication")]

    def port_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot`` now."""
        for line in cli(self.live_ports()[0], "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for rng in fields[8:]:
                lo, _, hi = rng.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no master serves slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL one server: what it held in memory is gone."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for port in self.ports:  # detached servers (bin/redis_cluster.py start)
            pidfile = os.path.join(self.dir, f"{port}.pid")
            with (
                contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError),
                open(pidfile) as f,
            ):
                os.kill(int(f.read()), signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ports(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--ports", default="7101-7103")
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "imcore-cluster"))
    args = parser.parse_args()
    ports = _ports(args.ports)
    if args.action == "stop":
        for port in ports:
            cli(port, "shutdown", "nosave")
        shutil.rmtree(args.dir, ignore_errors=True)
        return
    if all("cluster_state:ok" in cli(p, "cluster", "info") for p in ports):
        print(LocalCluster(ports).nodes)  # already up (a second `make run-cluster`)
        return
    for port in ports:  # a half-made cluster of an earlier run
        cli(port, "shutdown", "nosave")
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    cluster = LocalCluster(ports, replicas=args.replicas, dir=args.dir).start(detach=True)
    print(cluster.nodes, file=sys.stdout)


if __name__ == "__main__":
    main()
