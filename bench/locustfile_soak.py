"""Locust users of ``bench/soak.py``, a device each from ``SOAK_DATA``: ``ProbeDevice`` sends
with no wait (the capacity probe), ``SoakDevice`` runs the mix at ``SOAK_RATE_PER_USER`` tasks/s.
Every ``client_msg_id`` answered 200/201 goes to ``SOAK_ACKED`` when locust quits."""

import itertools
import json
import os
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, events, task

DATA = json.loads(Path(os.environ["SOAK_DATA"]).read_text())
RATE = float(os.environ.get("SOAK_RATE_PER_USER", "0"))
ACKED: list[str] = []
_devices = itertools.count()


@events.quitting.add_listener
def _write_acked(**_):
    Path(os.environ["SOAK_ACKED"]).write_text("\n".join(ACKED))


class ProbeDevice(FastHttpUser):
    wait_time = constant(0)

    def on_start(self):
        device = DATA["devices"][next(_devices) % len(DATA["devices"])]
        self.headers = {"Authorization": f"Bearer {device['token']}"}
        self.path = f"/api/v1/conversations/{device['conversation']}"
        self.prefix = f"{DATA['tag']}-{device['user_id']}-"
        self.sent = itertools.count()
        self.seq = self.version = 0

    def call(self, method: str, path: str, name: str, **kwargs):
        return self.client.request(method, path, headers=self.headers, name=name, **kwargs)

    @task(4)
    def send(self):
        cmid = f"{self.prefix}{next(self.sent)}"
        body = {"body": "soak message", "client_msg_id": cmid}
        resp = self.call("POST", f"{self.path}/messages", "send", json=body)
        if resp.status_code in (200, 201):
            ACKED.append(cmid)
            self.seq = resp.json()["seq"]


class SoakDevice(ProbeDevice):
    wait_time = constant_throughput(RATE) if RATE else constant(0)

    @task(2)
    def unread(self):
        self.call("GET", "/api/v1/unread", "unread")

    @task(2)
    def sync_pull(self):
        resp = self.call("GET", f"/api/v1/sync?since={self.version}&limit=200", "sync")
        if resp.status_code != 200:
            return
        page = resp.json()
        version = page["entries"][-1]["version"] if page["has_more"] else page["latest_version"]
        if version > self.version:
            self.version = version
            self.call("POST", "/api/v1/sync/ack", "ack", json={"version": version})

    @task(1)
    def history(self):
        after = max(self.seq - 20, 0)
        self.call("GET", f"{self.path}/messages?after_seq={after}&limit=20", "history")

    @task(1)
    def mark_read(self):
        if self.seq:
            self.call("POST", f"{self.path}/read", "read", json={"seq": self.seq})
