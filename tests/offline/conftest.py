import contextlib

import pytest
from django.test import Client

from imcore import services
from offline.apis import SyncOut
from tests.conftest import Member, celery_env
from tests.processes import uvicorn_served

TTL = 3.0  # the presence TTL of the test server
LIVE_TTL = 600.0  # the presence TTL of ``poke_server``: no periodic catch-up in a test


@pytest.fixture
def second_device():
    """``second_device(member, "laptop")``: another logged-in device of the same user."""

    def make(member: Member, device_id: str = "laptop") -> Member:
        _, token = services.device_login(
            username=member.user.username,
            password="pw-for-tests-1",
            device_id=device_id,
            platform="desktop",
        )
        return Member(user=member.user, token=token, client=Client())

    return make


def pull(member: Member, since: int, limit: int | None = None) -> dict:
    params = {"since": since} if limit is None else {"since": since, "limit": limit}
    response = member.get("/sync", **params)
    assert response.status_code == 200, response.content
    answer = response.json()
    # The answer is rendered without ninja's validation (offline.apis.rendered): it must be
    # exactly what validating it against SyncOut gives.
    assert SyncOut.model_validate(answer).model_dump(mode="json", exclude_none=True) == answer
    return answer


def pull_all(member: Member, since: int, limit: int | None = None) -> tuple[list[dict], int]:
    """Pull pages until ``has_more`` is false; returns (entries, latest version)."""
    entries: list[dict] = []
    while True:
        page = pull(member, since, limit)
        assert not page["gap"], page
        entries += page["entries"]
        if page["entries"]:
            since = page["entries"][-1]["version"]
        if not page["has_more"]:
            return entries, page["latest_version"]


def first_sync(member: Member) -> int:
    """A device's first pull (snapshot or entries); returns the version to continue from."""
    page = pull(member, 0)
    while page["has_more"]:
        page = pull(member, page["entries"][-1]["version"])
    return page["latest_version"]


@contextlib.contextmanager
def run_server(*, env: dict[str, str]):
    """uvicorn serving imcore.asgi in the environment ``env`` (``celery_env(...)``: the test
    database and Redis), pinging every third of its ``PRESENCE_TTL_S``; yields the WebSocket
    URL of ``/ws/v1/sync``."""
    ping = str(float(env["PRESENCE_TTL_S"]) / 3)
    options = ("--ws-ping-interval", ping, "--ws-ping-timeout", ping)
    with uvicorn_served(env=env, options=options) as port:
        yield f"ws://127.0.0.1:{port}/ws/v1/sync"


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    """uvicorn serving imcore.asgi on the test database and Redis, with a short presence TTL
    and small frames (so a package takes many frames)."""
    with django_db_blocker.unblock():
        env = celery_env(PRESENCE_TTL_S=TTL, SYNC_WS_FRAME_ENTRIES=50)
    with run_server(env=env) as url:
        yield url


@pytest.fixture(scope="module")
def poke_server(django_db_setup, django_db_blocker):
    """The server for delivery tests: its presence TTL is so long that a connection's periodic
    catch-up (every third of the TTL) never runs during a test, so what reaches a socket was
    brought by a live poke."""
    with django_db_blocker.unblock():
        env = celery_env(PRESENCE_TTL_S=LIVE_TTL, SYNC_WS_FRAME_ENTRIES=50)
    with run_server(env=env) as url:
        yield url
