"""Errors a service raises on purpose; the API turns each into a 4xx/5xx JSON response
``{"error": <code>, "message": <text>, "details": ...}``."""


class ApplicationError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details=None):
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(ApplicationError):
    status, code = 400, "bad_request"


class NotAuthenticated(ApplicationError):
    status, code = 401, "not_authenticated"


class PermissionDenied(ApplicationError):
    status, code = 403, "forbidden"


class NotFound(ApplicationError):
    status, code = 404, "not_found"


class Conflict(ApplicationError):
    status, code = 409, "conflict"


class Unavailable(ApplicationError):
    status, code = 503, "unavailable"


class RateLimited(ApplicationError):
    """Too many attempts; ``retry_after_s`` becomes the ``Retry-After`` header."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, details=None):
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s
