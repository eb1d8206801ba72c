"""URLs: the API under /api/v1/, the admin under /admin/. Unknown paths under /api/ get a
JSON 404 like every other API error."""

from django.contrib import admin
from django.http import JsonResponse
from django.urls import path, re_path

from delivery.views import metrics_view

from .api import api


def api_not_found(request, rest=""):
    return JsonResponse(
        {"error": "not_found", "message": f"no API endpoint at {request.path}"}, status=404
    )


urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("api/v1/", api.urls),
    re_path(r"^api/(?P<rest>.*)$", api_not_found),
]
