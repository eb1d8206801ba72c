"""The bearer-token cache (``imcore.services.device_authenticate_cached``), through the HTTP
API: a cached token costs no SQL, and every revocation (logout, re-login of the same device,
password change, deactivation) refuses the token at once even though it was cached."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from imcore import keys, services
from imcore.models import User
from tests.conftest import Member
from tests.imcore.test_logout import PASSWORD, login

# Revocations run on commit: the tests commit.
pytestmark = pytest.mark.django_db(transaction=True)


def cached(member: Member) -> bool:
    return bool(services.get_redis().exists(keys.token_device(services.token_hash(member.token))))


def warm(member: Member) -> None:
    """Two calls: the first fills the cache, the second is served from it without SQL for
    the token."""
    assert member.get("/unread").status_code == 200
    assert cached(member)
    with CaptureQueriesContext(connection) as queries:
        assert member.get("/unread").status_code == 200
    assert not [q for q in queries.captured_queries if "imcore_device" in q["sql"]]


def test_cached_token_needs_no_query(make_member):
    """A second call with the same token reads no device or user row."""
    warm(make_member("alice"))


def test_logout_of_another_device_refuses_its_cached_token(make_member):
    """DELETE /devices/{id}: that device's cached token is 401 at once."""
    alice = make_member("alice")
    laptop = login(alice, "laptop")
    warm(laptop)
    assert alice.delete("/devices/laptop").status_code == 204
    assert not cached(laptop)
    assert laptop.get("/unread").status_code == 401


def test_logout_of_this_device_refuses_its_cached_token(make_member):
    """DELETE /devices/current: the cached token is 401 at once, on messaging and sync
    calls."""
    alice = make_member("alice")
    warm(alice)
    assert alice.delete("/devices/current").status_code == 204
    assert alice.get("/unread").status_code == 401
    assert alice.post("/sync/ack", {"version": 0}).status_code == 401


def test_relogin_of_the_same_device_refuses_its_old_cached_token(make_member):
    """Logging the same device_id in again replaces its token: the old, cached one is 401 at
    once, the new one works."""
    alice = make_member("alice")
    warm(alice)
    again = login(alice, "phone")
    assert alice.get("/unread").status_code == 401
    assert again.get("/unread").status_code == 200


def test_password_change_refuses_the_other_devices_cached_tokens(make_member):
    """POST /users/me/password: every other device's cached token is 401 at once; the
    changing device keeps working (its cached user has no password hash to go stale)."""
    alice = make_member("alice")
    laptop = login(alice, "laptop")
    warm(alice)
    warm(laptop)
    response = alice.post(
        "/users/me/password", {"old_password": PASSWORD, "new_password": "another-pw-for-tests-2"}
    )
    assert response.status_code == 204, response.content
    assert laptop.get("/unread").status_code == 401
    assert alice.get("/unread").status_code == 200
    # The next change checks the new password, not a cached one.
    response = alice.post(
        "/users/me/password",
        {"old_password": "another-pw-for-tests-2", "new_password": "third-pw-for-tests-3"},
    )
    assert response.status_code == 204, response.content


def test_deactivated_user_cached_token_is_refused(make_member):
    """A user saved inactive (as the admin does) is refused at once; reactivated, the same
    token works again (read from PostgreSQL)."""
    alice = make_member("alice")
    warm(alice)
    user = User.objects.get(pk=alice.id)
    user.is_active = False
    user.save()
    assert alice.get("/unread").status_code == 401
    user.is_active = True
    user.save()
    assert alice.get("/unread").status_code == 200


def test_lookup_racing_a_logout_does_not_cache_the_dead_token(make_member, monkeypatch):
    """A look-up that read the token's row just before a logout committed cannot cache it
    after the logout's delete (the tombstone refuses the fill): the next call is 401."""
    alice = make_member("alice")
    laptop = login(alice, "laptop")
    read = services._device_by_hash

    def read_then_logout(hashed):
        device = read(hashed)  # the row, as it was just before the logout
        services.device_logout(device=device)
        return device

    monkeypatch.setattr(services, "_device_by_hash", read_then_logout)
    laptop.get("/unread")  # answered with the row it read; must not cache it
    monkeypatch.undo()
    assert not cached(laptop)
    assert laptop.get("/unread").status_code == 401


def test_redis_down_reads_postgresql(make_member, settings):
    """With the cache's Redis unreachable the token is read from PostgreSQL: a call that needs
    no Redis still works, and a logged-out token is still refused."""
    alice = make_member("alice")
    laptop = login(alice, "laptop")
    response = alice.post("/conversations", {"kind": "group", "members": []})
    assert response.status_code == 201, response.content
    path = f"/conversations/{response.json()['id']}/messages"
    warm(laptop)
    assert alice.delete("/devices/laptop").status_code == 204
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    assert laptop.get(path).status_code == 401
    assert alice.get(path).status_code == 200
