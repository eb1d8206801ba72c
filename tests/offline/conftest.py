import pytest
from django.test import Client

from imcore import services
from tests.conftest import Member


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
    return response.json()


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
