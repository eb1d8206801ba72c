"""Middleware of the API."""

from django.http import JsonResponse
from django.urls import get_resolver


class ApiMiddleware:
    """Calls under ``/api/`` are answered here, without the middleware listed after this one.

    That middleware serves the admin: sessions, CSRF, the logged-in user, flash messages,
    static files, the trailing-slash redirects. The API authenticates with bearer tokens, its
    views are CSRF-exempt, and its catch-all pattern answers every path. So none of it changes
    an API answer, and together with the URL resolution it was a third of a send's CPU
    (README 3g). The middleware listed before this one still applies:
    ``SecurityMiddleware`` and ``XFrameOptionsMiddleware`` add their headers to every answer.

    The view runs as Django's handler runs it: resolved against the root URLconf, with
    ``request.resolver_match`` set. Its exceptions reach the handler. Answers are JSON even
    where Django or django-ninja produce an HTML page on their own (405 Method Not Allowed),
    and the ``Allow`` header is kept. Each answer carries its ``Content-Length``, as
    ``CommonMiddleware`` would set it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        path = request.path_info
        if not path.startswith("/api/"):
            return self.get_response(request)
        match = get_resolver().resolve(path)  # the catch-all under api/ matches every path
        request.resolver_match = match
        response = match.func(request, *match.args, **match.kwargs)
        if response.status_code == 405 and not response.get("Content-Type", "").startswith(
            "application/json"
        ):
            response = _json_405(request, response)
        if not response.streaming and not response.has_header("Content-Length"):
            response.headers["Content-Length"] = str(len(response.content))
        return response


def _json_405(request, response) -> JsonResponse:
    allowed = response.get("Allow", "")
    json_response = JsonResponse(
        {
            "error": "method_not_allowed",
            "message": f"{request.method} is not allowed here; allowed: {allowed}",
        },
        status=405,
    )
    if allowed:
        json_response["Allow"] = allowed
    return json_response
