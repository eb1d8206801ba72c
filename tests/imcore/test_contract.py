"""The OpenAPI schema says what the server accepts, and Schemathesis holds the server to it.

``st run`` drives a real uvicorn process over every operation that /api/v1/schema lists (read
from the schema, never from a list here), with all of its checks, through its coverage,
fuzzing and stateful phases, as a device logged in through the API. The run must find no
server error and no contract failure beyond the kept ones in ``schemathesis-baseline.txt``.
"""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, broker_reset, celery_env
from tests.processes import uvicorn_served

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "schemathesis-baseline.txt"
CONFIG = HERE / "schemathesis.toml"
# Test cases per operation and phase: about 1,000 cases, under a minute on a loaded 2-core box.
MAX_EXAMPLES = int(os.environ.get("CONTRACT_MAX_EXAMPLES", 20))
PASSWORD = "contract-Pass-2026"
# The server's settings for the run: quiet logs (a 500 still logs at ERROR).
SERVER_ENV = {"LOG_LEVEL": "ERROR"}


def baseline() -> tuple[list[str], set[tuple[str, str]]]:
    """The kept mismatches: operations to skip (``METHOD path``) and accepted failures
    (``(code, operation)``). Every line must give its reason."""
    skips, accepted = [], set()
    for number, line in enumerate(BASELINE.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        kept, _, reason = line.partition(" | ")
        assert reason.strip(), f"{BASELINE.name}:{number} gives no reason: {line!r}"
        word, _, operation = kept.strip().partition(" ")
        if word == "skip":
            skips.append(operation)
        else:
            accepted.add((word, operation))
    return skips, accepted


@pytest.fixture
def api_server(transactional_db):
    """uvicorn serving imcore.asgi on the test database and Redis; yields the API's URL."""
    try:
        with uvicorn_served(env=celery_env(**SERVER_ENV)) as port:
            yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        broker_reset()  # the tasks the fuzzer's requests queued; no worker ran them


def seed(api: str, username: str) -> None:
    """The fuzzer's user, a friend, a direct conversation and a group with a message, so that
    the fuzzer's first calls find something to read."""
    for name in (username, f"{username}-friend"):
        created = requests.post(f"{api}/users", json={"username": name, "password": PASSWORD})
        assert created.status_code == 201, created.text
    friend = created.json()["id"]
    login = {"username": username, "password": PASSWORD, "device_id": "seed", "platform": "web"}
    token = requests.post(f"{api}/devices", json=login).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    for body in ({"kind": "direct", "members": [friend]}, {"kind": "group", "title": "g"}):
        conversation = requests.post(f"{api}/conversations", json=body, headers=auth).json()
    sent = requests.post(
        f"{api}/conversations/{conversation['id']}/messages",
        json={"body": "hello", "client_msg_id": "seed-1"},
        headers=auth,
    )
    assert sent.status_code == 201, sent.text


def test_server_keeps_the_openapi_contract(api_server, tmp_path):
    """Schemathesis finds no server error and no contract failure outside the baseline."""
    username = f"fuzzer-{secrets.token_hex(4)}"
    seed(api_server, username)
    skips, accepted = baseline()
    skip_args = [arg for operation in skips for arg in ("--exclude-name", operation)]
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(CONFIG),
        "run",
        f"{api_server}/schema",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "2",
        "--generation-database",
        "none",
        # Hypothesis' "too slow" health check times the data generation, which a loaded 2-core
        # box slows down; it says nothing about the API.
        "--suppress-health-check",
        "too_slow",
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(tmp_path / "report.json"),
        *skip_args,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SCHEMATHESIS_HOOKS": "tests.imcore.contract_hooks",
        "CONTRACT_API_URL": api_server,
        "CONTRACT_USERNAME": username,
        "CONTRACT_PASSWORD": PASSWORD,
        "CONTRACT_DEVICE_ID": "fuzzer",
    }
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    output = f"exit {run.returncode}\n{run.stdout[-20000:]}\n{run.stderr[-5000:]}"
    report_path = tmp_path / "report.json"
    assert report_path.exists(), f"no JSON report\n{output}"
    report = json.loads(report_path.read_text())
    summary = {k: report[k] for k in ("stop_reason", "operations", "phases", "errors")}
    output = f"{json.dumps(summary)}\n{output}"
    print(
        f"schemathesis: {report['test_cases']['generated']} cases over "
        f"{report['operations']['tested']} operations in {report['running_time']:.1f}s, "
        f"seed {report['seed']}, re-logins {report['auth']['reauth_count']}"
    )
    assert report["complete"], output
    ran = {
        phase: report["phases"][phase]["status"] for phase in ("coverage", "fuzzing", "stateful")
    }
    assert "skip" not in ran.values(), (ran, output)
    assert report["operations"]["tested"] == report["operations"]["selected"] > 0, output
    assert not report["errors"], output
    new = [
        f"{failure['code']} {operation}: {failure['title']}"
        for failure in report["failures"]
        for operation in failure["operations"]
        if (failure["code"], operation) not in accepted
    ]
    assert not new, "\n".join(new) + "\n\n" + output


def test_largest_bodies_the_schema_allows_fit(make_member, settings):
    """The largest bodies the schema allows pass the body size limit: no 413 for them."""
    alice = make_member()
    group = alice.post("/conversations", {"kind": "group"}).json()["id"]
    astral = "\U0001f600" * settings.MESSAGE_BODY_MAX_CHARS  # 12 bytes each as \\u escapes
    sent = alice.post(
        f"/conversations/{group}/messages", {"body": astral, "client_msg_id": "\U0001f600" * 64}
    )
    assert sent.status_code == 201, sent.content[:300]
    assert sent.json()["body"] == astral
    members = [2**63 - 1 - i for i in range(settings.GROUP_MAX_MEMBERS)]
    refused = alice.post(
        "/conversations", {"kind": "group", "members": members, "title": "é" * 200}
    )
    assert refused.status_code == 400, refused.content[:300]  # the ids exist nowhere
    assert refused.json()["error"] == "bad_request"


def test_integral_floats_are_integers(make_member):
    """An integral float (``2.0``) is the integer it writes, as JSON Schema says; ``2.5`` is
    refused."""
    alice, bob = make_member(), make_member()
    group = alice.post("/conversations", {"kind": "group", "members": [float(bob.id)]}).json()
    assert group["members"] == sorted([alice.id, bob.id])
    bob.send(group["id"])
    read = alice.post(f"/conversations/{group['id']}/read", {"seq": 1.0})
    assert read.status_code == 200, read.content
    assert read.json()["unread"] == 0
    half = alice.post(f"/conversations/{group['id']}/read", {"seq": 0.5})
    assert half.status_code == 422 and half.json()["error"] == "invalid_request"
