"""The HTTP API object: device-token authentication and one JSON error shape for every
failure, ``{"error": <code>, "message": <text>, "details": <optional>}``."""

import logging

import kombu.exceptions
import redis
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer
from redis.exceptions import RedisClusterException

from counters.strategies import CountersBusy
from counters.transitions import CountersNotLoaded, CountersNotMember
from offline.apis import router as sync_router
from offline.store import SyncUnavailable

from .apis import router
from .errors import ApplicationError, RateLimited
from .services import device_authenticate_cached

logger = logging.getLogger(__name__)


class DeviceTokenAuth(HttpBearer):
    """``Authorization: Bearer <token>``, the token a device got from ``POST /devices``, looked
    up through the token cache (:func:`~imcore.services.device_authenticate_cached`). The
    sync calls read the device's sync state (last seen, acked version) from PostgreSQL only
    when they need it."""

    def __call__(self, request):
        """:class:`HttpBearer`'s, reading the header from ``request.META`` rather than building
        ``request.headers`` from every header of the request first."""
        value = request.META.get("HTTP_AUTHORIZATION")
        if not value:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != self.openapi_scheme:
            return None
        return self.authenticate(request, token)

    def authenticate(self, request, token):
        device = device_authenticate_cached(token=token)
        if device is None or not device.user.is_active:
            return None
        request.device = device
        return device


api = NinjaAPI(
    title="imcore API",
    version="1",
    description="Messages, exact unread counters and badge. Authenticate with the bearer "
    "token that POST /devices returns. Every error is JSON, ``{error, message, details}``. "
    'Request bodies are validated strictly against this schema (``"5"`` is not a number, '
    "unknown fields are refused, text cannot hold NUL; an integral number such as ``2.0`` is "
    "an integer): a body that breaks it gets 422 ``invalid_request``, one that is not JSON 400 "
    "``malformed_body``, one too large 413 ``body_too_large``. A request the schema allows "
    "gets 400 ``bad_request`` only where its operation lists why.",
    urls_namespace="api-v1",
    openapi_url="/schema",
    docs_url="/docs",
    auth=DeviceTokenAuth(),
)


def error(request, status: int, code: str, message: str, details=None):
    body = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return api.create_response(request, body, status=status)


@api.exception_handler(ApplicationError)
def on_application_error(request, exc: ApplicationError):
    return error(request, exc.status, exc.code, exc.message, exc.details)


@api.exception_handler(RateLimited)
def on_rate_limited(request, exc: RateLimited):
    response = error(request, exc.status, exc.code, exc.message, exc.details)
    response["Retry-After"] = str(exc.retry_after_s)
    return response


@api.exception_handler(ValidationError)
def on_validation_error(request, exc: ValidationError):
    details = [
        {
            "loc": [str(p) for p in e.get("loc", ()) if p != "payload"],
            "msg": e.get("msg"),
            "type": e.get("type"),
        }
        for e in exc.errors
    ]
    where = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details)
    return error(request, 422, "invalid_request", f"the request is not valid: {where}", details)


@api.exception_handler(AuthenticationError)
def on_authentication_error(request, exc):
    return error(
        request,
        401,
        "not_authenticated",
        "a valid device token is required: Authorization: Bearer <token>",
    )


@api.exception_handler(HttpError)
def on_http_error(request, exc: HttpError):
    code = "malformed_body" if exc.status_code == 400 else "http_error"
    message = exc.message
    if message.startswith("Cannot parse request body"):
        message = "the request body is not valid JSON"
    return error(request, exc.status_code, code, message)


@api.exception_handler(Http404)
def on_404(request, exc):
    return error(request, 404, "not_found", "not found")


@api.exception_handler(RequestDataTooBig)
def on_too_big(request, exc):
    from django.conf import settings

    return error(
        request,
        413,
        "body_too_large",
        f"the request body is larger than {settings.API_MAX_BODY_BYTES} bytes",
    )


@api.exception_handler(redis.RedisError)
@api.exception_handler(RedisClusterException)
def on_redis_error(request, exc):
    logger.exception("counter store unavailable")
    return error(
        request,
        503,
        "counters_unavailable",
        "the counter store is unavailable; what was written to the database is kept, "
        "retry the same request",
    )


@api.exception_handler(CountersBusy)
def on_counters_busy(request, exc):
    return error(request, 503, "counters_busy", str(exc))


@api.exception_handler(CountersNotLoaded)
@api.exception_handler(CountersNotMember)
def on_counters_moving(request, exc):
    # Redis lost the user's counters again between the rebuild and the retry.
    return error(request, 503, "counters_unavailable", "the counters are being rebuilt; retry")


@api.exception_handler(SyncUnavailable)
def on_sync_unavailable(request, exc):
    return error(request, 503, "sync_unavailable", "the sync store is being reloaded; retry")


@api.exception_handler(kombu.exceptions.OperationalError)
def on_broker_error(request, exc):
    logger.exception("broker unavailable")
    return error(
        request,
        503,
        "broker_unavailable",
        "the task broker is unavailable; what was written to the database is kept, "
        "retry the same request",
    )


@api.exception_handler(DatabaseError)
def on_database_error(request, exc):
    logger.exception("database error")
    return error(request, 503, "database_unavailable", "the database could not serve this request")


api.add_router("", router)
api.add_router("", sync_router)
