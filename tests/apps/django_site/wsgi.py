"""WSGI config of the project, as `django-admin startproject` writes it, plus pixels.

The only change from Django's template is the last line. Records go to the store
named by the PIXEL_STORE environment variable.
"""

import os

from django.core.wsgi import get_wsgi_application

from pixel_middleware import PixelMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")

application = PixelMiddleware(get_wsgi_application(), write_keys={"django-site-key"})
