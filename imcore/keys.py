"""Redis key layout of the imcore app: the cache of bearer tokens (see
:func:`imcore.services.device_authenticate_cached`).

``imc:{t:<token sha256>}:dev``   STRING the device and user fields the API needs (JSON), for
                                 ``AUTH_TOKEN_CACHE_TTL_S`` seconds
``imc:{t:<token sha256>}:gone``  STRING set when the token was revoked (logout, re-login of
                                 its device, password change, deactivation), for
                                 ``AUTH_TOKEN_REVOKED_TTL_S``: a lookup that read the token's
                                 row before the revocation committed cannot cache it after

Both keys of a token share the hash tag ``{t:<sha256>}``, so the fill script touches one
Cluster slot.
"""

from counters.keys import PREFIX


def token_tag(token_hash: str) -> str:
    return f"{{t:{token_hash}}}"


def token_prefix() -> str:
    """What every token key starts with (the process copies track it: imcore.tracked)."""
    return f"{PREFIX}:{{t:"


def token_device(token_hash: str) -> str:
    return f"{PREFIX}:{token_tag(token_hash)}:dev"


def token_revoked(token_hash: str) -> str:
    return f"{PREFIX}:{token_tag(token_hash)}:gone"
