"""WSGI entry point (gunicorn imcore.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "imcore.settings")
application = get_wsgi_application()
