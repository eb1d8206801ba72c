"""Logging a device out (``DELETE /devices/{device_id}``, ``DELETE /devices/current``) and
changing the password (``POST /users/me/password``), through the HTTP API: the token dies at
once, the pushkey and presence are forgotten, and bad requests change nothing. The socket side
is in tests/offline/test_live_logout.py."""

import pytest
from django.test import Client

from imcore import services
from imcore.errors import NotAuthenticated
from imcore.models import Device
from offline import keys, store
from offline.push import push_badge_changed
from tests.conftest import Member

# The logout's Redis clean-up runs on commit: the tests commit.
pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "pw-for-tests-1"


def login(member: Member, device_id: str, password: str = PASSWORD) -> Member:
    """Another device of the member's user, logged in as a client would."""
    response = Client().post(
        "/api/v1/devices",
        {
            "username": member.user.username,
            "password": password,
            "device_id": device_id,
            "platform": "desktop",
        },
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    return Member(user=member.user, token=response.json()["token"], client=Client())


def device_ids(member: Member) -> list[str]:
    response = member.get("/devices")
    assert response.status_code == 200, response.content
    return [d["device_id"] for d in response.json()["devices"]]


def pk_of(member: Member, device_id: str) -> int:
    return Device.objects.get(user=member.user, device_id=device_id).pk


def test_logging_out_another_device_kills_its_token_at_once(make_member):
    """DELETE /devices/{id} answers 204; that device's very next request is 401, and it is
    gone from GET /devices."""
    alice = make_member("alice")
    laptop = login(alice, "laptop")
    assert laptop.get("/devices").status_code == 200
    response = alice.delete("/devices/laptop")
    assert response.status_code == 204, response.content
    refused = laptop.get("/devices")
    assert refused.status_code == 401
    assert refused.json()["error"] == "not_authenticated"
    assert laptop.post("/sync/ack", {"version": 0}).status_code == 401
    assert device_ids(alice) == ["phone"]


def test_logging_out_the_current_device(make_member):
    """DELETE /devices/current logs the calling device out; the user's other devices stay."""
    alice = make_member("alice")
    laptop = login(alice, "laptop")
    assert laptop.delete("/devices/current").status_code == 204
    assert laptop.get("/devices").status_code == 401
    assert laptop.delete("/devices/current").status_code == 401
    assert device_ids(alice) == ["phone"]


def laptop_in_redis(user_id: int, pk: int) -> list[str]:
    """The keys of the offline app's Redis that hold something of device ``pk``."""
    client = store.client()
    found = [
        key
        for key in (keys.online(user_id), keys.PUSH_DUE)
        if client.zscore(key, str(pk)) is not None
    ]
    found += [
        key
        for key in (keys.PUSH_KIND, keys.PUSH_LAST, keys.ACKS_PENDING, keys.SEEN_PENDING)
        if client.hexists(key, str(pk))
    ]
    found += [
        key for key in (keys.package(user_id, pk), keys.snapshot(user_id, pk)) if client.exists(key)
    ]
    return found


def test_logout_forgets_pushkey_presence_and_pending_state(make_member):
    """A logged-out device gets no more pushes and is not online, and Redis keeps nothing of
    it: presence, scheduled push, pending ack and last-seen, prepared snapshot."""
    alice = make_member("alice")
    laptop = login(alice, "laptop")
    assert laptop.put("/devices/current/pushkey", {"pushkey": "pk-laptop"}).status_code == 204
    pk = pk_of(alice, "laptop")
    assert push_badge_changed(user_ids=[alice.id], alert=True) == 1  # offline, has a pushkey
    store.presence_touch(user_id=alice.id, device_pk=pk, ttl_s=60)
    store.ack_absorb(device_pk=pk, version=1)
    store.store_snapshot(user_id=alice.id, device_pk=pk, snapshot={}, ttl_s=60)
    assert len(laptop_in_redis(alice.id, pk)) == 6  # all but PUSH_LAST (nothing sent yet)

    assert alice.delete("/devices/laptop").status_code == 204

    assert laptop_in_redis(alice.id, pk) == []
    assert store.presence_online([alice.id])[alice.id] == set()
    assert not Device.objects.filter(pk=pk).exists()
    assert push_badge_changed(user_ids=[alice.id], alert=True) == 0
    assert [d["device_id"] for d in alice.get("/devices").json()["devices"]] == ["phone"]


def test_logging_in_again_after_a_logout_starts_a_new_device(make_member):
    """The same device_id can log in again: a new device with a new token, the old token
    stays dead."""
    alice = make_member("alice")
    old = login(alice, "laptop")
    assert alice.delete("/devices/laptop").status_code == 204
    new = login(alice, "laptop")
    assert new.get("/devices").status_code == 200
    assert old.get("/devices").status_code == 401
    assert device_ids(alice) == ["phone", "laptop"]


@pytest.mark.parametrize(
    "path, status",
    [
        ("/devices/tablet", 404),  # unknown
        ("/devices/bobs-phone", 404),  # another user's
        ("/devices/" + "x" * 65, 422),  # longer than a device_id can be
        ("/devices/a%20b", 422),  # not a device_id
        ("/devices/a%00b", 422),  # NUL
    ],
)
def test_logging_out_a_device_that_is_not_mine_is_refused_and_changes_nothing(
    make_member, path, status
):
    """Unknown or another user's device: 404 JSON; a malformed id: 422 JSON; no device and
    no token changes."""
    alice, bob = make_member("alice"), make_member("bob", device_id="bobs-phone")
    before = sorted(Device.objects.values_list("pk", "token_hash"))
    response = alice.delete(path)
    assert response.status_code == status, response.content
    assert response.json()["error"] == {404: "not_found", 422: "invalid_request"}[status]
    assert sorted(Device.objects.values_list("pk", "token_hash")) == before
    assert bob.get("/devices").status_code == 200


@pytest.mark.parametrize("token", ["", "not-a-token"])
def test_logout_without_a_valid_token_is_401_and_changes_nothing(make_member, token):
    """No token or a bad one: 401, every device stays logged in."""
    alice = make_member("alice")
    before = sorted(Device.objects.values_list("pk", "token_hash"))
    for path in ("/devices/phone", "/devices/current"):
        response = Client().delete(
            f"/api/v1{path}", headers={"Authorization": f"Bearer {token}"} if token else {}
        )
        assert response.status_code == 401
        assert response.json()["error"] == "not_authenticated"
    assert sorted(Device.objects.values_list("pk", "token_hash")) == before
    assert alice.get("/devices").status_code == 200


def test_current_is_not_a_device_id(make_member):
    """A device cannot log in as "current" (that name is the calling device in the API)."""
    alice = make_member("alice")
    response = Client().post(
        "/api/v1/devices",
        {"username": "alice", "password": PASSWORD, "device_id": "current", "platform": "ios"},
        content_type="application/json",
    )
    assert response.status_code == 422
    assert not Device.objects.filter(user=alice.user, device_id="current").exists()


# ---- password change -----------------------------------------------------------------------


def change(member: Member, old: str, new: str, **extra):
    return member.post("/users/me/password", {"old_password": old, "new_password": new, **extra})


def test_password_change_logs_out_every_other_device(make_member):
    """204; the other devices' tokens die, the current one works on; only the new password
    logs in."""
    alice, bob = make_member("alice"), make_member("bob")
    laptop, tablet = login(alice, "laptop"), login(alice, "tablet")
    response = change(alice, PASSWORD, "a-new-long-passphrase")
    assert response.status_code == 204, response.content
    assert laptop.get("/devices").status_code == 401
    assert tablet.get("/devices").status_code == 401
    assert device_ids(alice) == ["phone"]
    assert bob.get("/devices").status_code == 200  # another user's devices are not touched
    refused = Client().post(
        "/api/v1/devices",
        {"username": "alice", "password": PASSWORD, "device_id": "x", "platform": "ios"},
        content_type="application/json",
    )
    assert refused.status_code == 401
    login(alice, "laptop", password="a-new-long-passphrase")


@pytest.mark.parametrize(
    "body, status, error",
    [
        (
            {"old_password": "wrong-password", "new_password": "a-new-long-passphrase"},
            403,
            "forbidden",
        ),
        ({"old_password": PASSWORD, "new_password": "123"}, 400, "bad_request"),
        ({"old_password": PASSWORD, "new_password": "alice"}, 400, "bad_request"),
        ({"old_password": PASSWORD}, 422, "invalid_request"),
        ({"old_password": PASSWORD, "new_password": ""}, 422, "invalid_request"),
        ({"old_password": PASSWORD, "new_password": 12345678901}, 422, "invalid_request"),
        (
            {"old_password": PASSWORD, "new_password": "a-new-long-passphrase", "x": 1},
            422,
            "invalid_request",
        ),
    ],
)
def test_a_refused_password_change_changes_nothing(make_member, body, status, error):
    """A wrong old password is 403, a new password the validators refuse is 400 with their
    reasons, a malformed body 422; the password and every device stay as they were."""
    alice = make_member("alice")
    login(alice, "laptop")
    before = (alice.user.password, sorted(Device.objects.values_list("pk", "token_hash")))
    response = alice.post("/users/me/password", body)
    assert response.status_code == status, response.content
    assert response.json()["error"] == error
    if status == 400:
        assert response.json()["details"]  # the validators' messages
    alice.user.refresh_from_db()
    assert (alice.user.password, sorted(Device.objects.values_list("pk", "token_hash"))) == before


def test_password_change_needs_a_token(make_member):
    """No token: 401, nothing changes."""
    alice = make_member("alice")
    response = Client().post(
        "/api/v1/users/me/password",
        {"old_password": PASSWORD, "new_password": "a-new-long-passphrase"},
        content_type="application/json",
    )
    assert response.status_code == 401
    alice.user.refresh_from_db()
    assert alice.user.check_password(PASSWORD)


def test_a_login_checked_against_the_old_password_cannot_outlive_the_change(
    make_member, monkeypatch
):
    """A login whose password check passed before a password change committed is refused
    (the user's row is locked and its password compared again), so no device logged in with
    the old password survives the change."""
    alice = make_member("alice")
    stale = type(alice.user).objects.get(pk=alice.id)  # what authenticate() returned earlier
    assert change(alice, PASSWORD, "a-new-long-passphrase").status_code == 204

    # The interleaving: authenticate() ran (and passed) before the change committed.
    monkeypatch.setattr(services, "authenticate", lambda **kw: stale)
    with pytest.raises(NotAuthenticated):
        services.device_login(username="alice", password=PASSWORD, device_id="late", platform="ios")
    assert not Device.objects.filter(device_id="late").exists()


def test_a_pushkey_set_by_a_request_that_raced_the_logout_is_401_not_503(make_member):
    """Contract fuzzing found it: a pushkey request whose device was logged out while it ran
    (it authenticated before the row went) answered 503 ``database_unavailable``; it is 401,
    as the device's next request would be, and nothing is written."""
    alice = make_member("alice")
    laptop = login(alice, "laptop")
    device = Device.objects.get(pk=pk_of(alice, "laptop"))  # what the request authenticated
    assert laptop.delete("/devices/current").status_code == 204
    for pushkey in ("a-key", ""):
        with pytest.raises(NotAuthenticated):
            services.device_pushkey_set(device=device, pushkey=pushkey, app_id=None)
    assert not Device.objects.filter(pk=device.pk).exists()
    assert device_ids(alice) == ["phone"]
