"""Rate limits of sign-up and login, so that guessing passwords is slow.

Each attempt is counted per username and per client address with django-ratelimit, in the
``ratelimit`` cache (Redis, shared by every server process; ``INCR`` is atomic, so parallel
guesses cannot slip past a limit). Every attempt counts, right or wrong: a limit is a number of
tries per window, and a correct password during a lockout is refused like a wrong one (the
password is not even checked). Over either limit the API answers 429 with ``Retry-After``, the
seconds until the window that is over its limit ends.

Rates are settings (``AUTH_RATE_*``) in django-ratelimit's syntax ``<count>/<period>``, the
period ``s``, ``m``, ``h`` or ``d`` ("10/m": ten a minute); an empty rate turns that limit
off. The client address is ``REMOTE_ADDR`` (IPv6 counted per /64); behind a reverse proxy the
ASGI server must set it from the proxy's header (uvicorn does for the addresses in
``--forwarded-allow-ips``, default 127.0.0.1), or every client shares the proxy's limit.

Keys (prefix ``imc:rl`` of the ``ratelimit`` cache): one counter per (group, window, key),
expiring with its window; the username is NFKC-normalized and case-folded, so "Alice" and
"alice" share one.
"""

import unicodedata
from typing import Literal

from django.conf import settings
from django_ratelimit.core import get_usage

from .errors import RateLimited

Action = Literal["login", "signup"]

RATES = {
    "login": ("AUTH_RATE_LOGIN_PER_USERNAME", "AUTH_RATE_LOGIN_PER_ADDRESS"),
    "signup": ("AUTH_RATE_SIGNUP_PER_USERNAME", "AUTH_RATE_SIGNUP_PER_ADDRESS"),
}


def _username_key(username: str) -> str:
    return unicodedata.normalize("NFKC", username).casefold()


def auth_attempt(*, request, action: Action, username: str) -> None:
    """Count one attempt of ``action`` for ``username`` from the request's address; raises
    :class:`RateLimited` when either count is over its rate."""
    per_username, per_address = (getattr(settings, name) for name in RATES[action])
    username_key = _username_key(username)
    limits = [
        (f"auth.{action}.username", lambda group, request: username_key, per_username),
        (f"auth.{action}.address", "ip", per_address),
    ]
    waits = []
    for group, key, rate in limits:
        if not rate:
            continue
        usage = get_usage(request, group=group, key=key, rate=rate, increment=True)
        if usage is not None and usage["should_limit"]:
            waits.append(max(usage["time_left"], 1))
    if waits:
        raise RateLimited(
            f"too many {action} attempts; retry in {max(waits)} s", retry_after_s=max(waits)
        )
