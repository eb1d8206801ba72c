"""WSGI entry point (the Procfile's `app`: granian imcore.wsgi:application)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "imcore.settings")
application = get_wsgi_application()
