"""Middleware of the API."""

from django.http import JsonResponse


class ApiJsonErrorsMiddleware:
    """Answers under ``/api/`` are JSON even where Django or django-ninja produce an HTML page
    on their own (405 Method Not Allowed); the ``Allow`` header is kept."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if (
            request.path.startswith("/api/")
            and response.status_code == 405
            and not response.get("Content-Type", "").startswith("application/json")
        ):
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
        return response
