"""ASGI config of the project, as `django-admin startproject` writes it, plus pixels.

The only change from Django's template is the wrapped application. Records go to
the store named by the PIXEL_STORE environment variable (PIXEL_DURABLE=0: answer
before the commit). Django itself does not speak ASGI
lifespan; the middleware answers it, so that it still flushes at shutdown.
"""

import os

from django.core.asgi import get_asgi_application

from pixel_middleware import PixelASGIMiddleware

# Before get_asgi_application(), which reads the settings.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")

application = PixelASGIMiddleware(
    get_asgi_application(),
    write_keys={"django-site-key"},
    durable=os.environ.get("PIXEL_DURABLE", "1") != "0",
)
