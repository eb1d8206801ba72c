"""imcore: the Django project and the core messaging domain."""

from .celery import app as celery_app

__all__ = ("celery_app",)
