"""WSGI entry point (the Procfile's `app`: uWSGI, bin/uwsgi.ini)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "imcore.settings")
application = get_wsgi_application()
