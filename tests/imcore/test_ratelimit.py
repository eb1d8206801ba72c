"""Rate limits of sign-up and login (imcore/ratelimit.py): per username and per client
address, 429 JSON with ``Retry-After``, a correct password during the lockout changes nothing,
and the counts live in Redis, shared by every server process. The rates are set low here (per
hour, so a window does not roll over during a test); tests/settings.py sets them high."""

import pytest
import requests
from django.test import Client

from counters.redis import get_redis
from imcore.models import Device, User
from tests.conftest import celery_env
from tests.offline.conftest import run_server

PASSWORD = "pw-for-tests-1"


def login(username: str, password: str, address: str = "127.0.0.1", device_id: str = "d1"):
    return Client(REMOTE_ADDR=address).post(
        "/api/v1/devices",
        {"username": username, "password": password, "device_id": device_id, "platform": "ios"},
        content_type="application/json",
    )


def signup(username: str, address: str = "127.0.0.1"):
    return Client(REMOTE_ADDR=address).post(
        "/api/v1/users",
        {"username": username, "password": "a-long-passphrase-1"},
        content_type="application/json",
    )


def assert_limited(response, window_s: int = 3600) -> None:
    assert response.status_code == 429, response.content
    body = response.json()
    assert body["error"] == "rate_limited"
    assert body["message"]
    assert 1 <= int(response["Retry-After"]) <= window_s


@pytest.fixture
def alice(db):
    return User.objects.create_user("alice", password=PASSWORD)


def test_login_is_limited_per_username(settings, alice):
    """Past the username's limit a login is 429 from any address, even with the right
    password (no device is created, none has its token replaced), while other usernames log
    in."""
    settings.AUTH_RATE_LOGIN_PER_USERNAME = "3/h"
    settings.AUTH_RATE_LOGIN_PER_ADDRESS = ""
    assert login("alice", PASSWORD, device_id="d1").status_code == 201
    d1 = Device.objects.get(user=alice, device_id="d1").token_hash
    for i in range(2):
        assert login("alice", "wrong", address=f"10.0.0.{i}").status_code == 401
    assert_limited(login("alice", PASSWORD, address="10.0.1.1", device_id="d2"))
    assert_limited(login("alice", PASSWORD, address="10.0.1.1", device_id="d1"))
    assert_limited(login("ALICE", PASSWORD, address="10.0.1.2"))  # same username, case-folded
    # No new device, and d1's token is not replaced by the refused login.
    assert list(Device.objects.filter(user=alice).values_list("device_id", "token_hash")) == [
        ("d1", d1)
    ]
    User.objects.create_user("bob", password=PASSWORD)
    assert login("bob", PASSWORD, address="10.0.0.0").status_code == 201


def test_login_is_limited_per_address(settings, alice):
    """Past an address's limit a login from it is 429 whatever the username, even with the
    right password (no device is created); other addresses log in."""
    settings.AUTH_RATE_LOGIN_PER_USERNAME = ""
    settings.AUTH_RATE_LOGIN_PER_ADDRESS = "3/h"
    for name in ("bob", "carol", "dave"):
        assert login(name, "wrong", address="10.0.0.7").status_code == 401
    assert_limited(login("alice", PASSWORD, address="10.0.0.7"))
    assert not Device.objects.filter(user=alice).exists()
    assert login("alice", PASSWORD, address="10.0.0.8").status_code == 201


def test_ipv6_addresses_are_counted_per_64(settings, alice):
    """IPv6 clients are counted per /64, so one host cannot rotate addresses in its prefix."""
    settings.AUTH_RATE_LOGIN_PER_USERNAME = ""
    settings.AUTH_RATE_LOGIN_PER_ADDRESS = "2/h"
    assert login("bob", "wrong", address="2001:db8::1").status_code == 401
    assert login("bob", "wrong", address="2001:db8::2").status_code == 401
    assert_limited(login("alice", PASSWORD, address="2001:db8::ffff"))
    assert login("alice", PASSWORD, address="2001:db8:0:1::1").status_code == 201


def test_signup_is_limited_per_address(settings, db):
    """Past an address's sign-up limit a sign-up is 429 and creates no user."""
    settings.AUTH_RATE_SIGNUP_PER_USERNAME = ""
    settings.AUTH_RATE_SIGNUP_PER_ADDRESS = "2/h"
    assert signup("u1", address="10.0.0.9").status_code == 201
    assert signup("u2", address="10.0.0.9").status_code == 201
    assert_limited(signup("u3", address="10.0.0.9"))
    assert not User.objects.filter(username="u3").exists()
    assert signup("u3", address="10.0.0.10").status_code == 201


def test_signup_is_limited_per_username(settings, db):
    """Past a username's sign-up limit tries at that username are 429 from any address."""
    settings.AUTH_RATE_SIGNUP_PER_USERNAME = "2/h"
    settings.AUTH_RATE_SIGNUP_PER_ADDRESS = ""
    assert signup("carol", address="10.0.0.1").status_code == 201
    assert signup("carol", address="10.0.0.2").status_code == 409  # taken
    assert_limited(signup("carol", address="10.0.0.3"))
    assert signup("dave", address="10.0.0.3").status_code == 201


def test_password_change_counts_as_a_login_attempt(settings, make_member):
    """Guessing the old password through a password change is limited like a login; the
    right old password during the lockout changes nothing."""
    settings.AUTH_RATE_LOGIN_PER_USERNAME = "2/h"
    settings.AUTH_RATE_LOGIN_PER_ADDRESS = ""
    alice = make_member("alice")
    for _ in range(2):
        response = alice.post(
            "/users/me/password", {"old_password": "wrong", "new_password": "a-new-passphrase"}
        )
        assert response.status_code == 403
    assert_limited(
        alice.post(
            "/users/me/password", {"old_password": PASSWORD, "new_password": "a-new-passphrase"}
        )
    )
    alice.user.refresh_from_db()
    assert alice.user.check_password(PASSWORD)


@pytest.mark.django_db(transaction=True)
def test_the_counts_are_shared_by_every_server_process(settings, alice):
    """Attempts counted in this process count in a separate server process too: the counters
    are in Redis (under ``imc:rl:``), not in a process's memory."""
    env = celery_env(
        PRESENCE_TTL_S=3, AUTH_RATE_LOGIN_PER_USERNAME="2/h", AUTH_RATE_LOGIN_PER_ADDRESS=""
    )
    with run_server(env=env) as ws_url:
        url = ws_url.replace("ws://", "http://").replace("/ws/v1/sync", "/api/v1/devices")
        body = {"username": "alice", "password": PASSWORD, "device_id": "d1", "platform": "ios"}
        settings.AUTH_RATE_LOGIN_PER_USERNAME = "2/h"
        settings.AUTH_RATE_LOGIN_PER_ADDRESS = ""
        assert login("alice", "wrong").status_code == 401
        assert login("alice", "wrong").status_code == 401
        response = requests.post(url, json=body, timeout=10)
        assert response.status_code == 429, response.text
        assert response.json()["error"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 3600
    assert any(key.startswith("imc:rl:") for key in get_redis().scan_iter())
    assert not Device.objects.filter(user=alice).exists()
