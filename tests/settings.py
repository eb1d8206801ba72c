"""Test settings: the project's settings with the tests' own Redis databases, so a test run
never touches what `make run` serves (PostgreSQL: pytest-django's test_<name> database)."""

import os

os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
# The Timer fires more often than in production so tests that wait for it stay short.
os.environ.setdefault("COUNTERS_FLUSH_INTERVAL", "0.3")
os.environ.setdefault("SYNC_ACK_FLUSH_INTERVAL_S", "0.3")
os.environ.setdefault("PUSH_TICK_S", "0.3")
# Tests log many devices in from one address; the rate-limit tests set low rates themselves.
os.environ.setdefault("AUTH_RATE_LOGIN_PER_USERNAME", "100000/m")
os.environ.setdefault("AUTH_RATE_LOGIN_PER_ADDRESS", "100000/m")
os.environ.setdefault("AUTH_RATE_SIGNUP_PER_USERNAME", "100000/m")
os.environ.setdefault("AUTH_RATE_SIGNUP_PER_ADDRESS", "100000/m")

from imcore.settings import *  # noqa: F403

# Password hashing at full strength costs ~0.5 s a login; tests log in hundreds of devices.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Beat runs only the Timer, the ack flush and the push sender in tests; reconcile and trim
# are called directly.
CELERY_BEAT_SCHEDULE = {
    name: CELERY_BEAT_SCHEDULE[name]  # noqa: F405
    for name in ("counters-timer", "offline-flush-acks", "offline-push-due")
}
# WhiteNoise scans the static files each time a test client builds its middleware chain.
MIDDLEWARE = [m for m in MIDDLEWARE if not m.startswith("whitenoise.")]  # noqa: F405
