"""A Django project (ASGI, `get_asgi_application`) served as `asgi:` and reloaded under load (issue 22).

The test writes a minimal Django project into its temp directory (settings,
one URL, the stock `asgi.py`), runs it as `app: asgi:djproj.asgi:application`,
and reloads it under a small bounded keep-alive load: no failed request, no
reconnect, and every answer after a reload from the new generation.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.support.keepalive import KeepAliveLoad
from tests.support.reloads import reload_under_load
from tests.support.upgraderd_proc import Daemon, free_port

pytestmark = pytest.mark.e2e

RELOADS = 3
CLIENTS = 8

PROJECT = {
    "djproj/__init__.py": "",
    "djproj/settings.py": '''
        SECRET_KEY = "test-only-not-secret"
        DEBUG = False
        ALLOWED_HOSTS = ["*"]
        ROOT_URLCONF = "djproj.urls"
        INSTALLED_APPS: list[str] = []
        MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]   # sets Content-Length
        DATABASES: dict[str, object] = {}
        USE_TZ = True
    ''',
    "djproj/urls.py": '''
        import os

        from django.http import HttpResponse
        from django.urls import path


        def hello(request, rest=""):
            gen = os.environ.get("UPGRADERD_GENERATION")
            body = f"generation={gen} server=django path={request.path} peer={request.META.get('REMOTE_PORT')}\\n"
            return HttpResponse(body, content_type="text/plain")


        urlpatterns = [path("", hello), path("<path:rest>", hello)]
    ''',
    "djproj/asgi.py": '''
        import os

        from django.core.asgi import get_asgi_application

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj.settings")
        application = get_asgi_application()
    ''',
}


def test_django_asgi_app_reloads_with_no_failed_request(tmp_path):
    for name, text in PROJECT.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    port = free_port()
    cfg = {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port}],
           "workers": {"count": 2, "app": "asgi:djproj.asgi:application", "cwd": str(tmp_path)},
           "http": {"access_log": False}}
    with Daemon(tmp_path, cfg).start() as d:
        load = KeepAliveLoad("127.0.0.1", port, clients=CLIENTS, max_seconds=120)
        report = reload_under_load(d, port, RELOADS, load=load)
        log = d.log()
    result = report.result
    assert result.failures == {}, (result.failures, result.examples)
    assert report.generations == list(range(2, 2 + RELOADS))
    for gen in report.generations:
        assert report.stale[gen] == {} and report.fresh[gen] > 0, gen
    assert all(" server=django " in body for body in result.bodies)
    assert (load.announced, load.unannounced, load.connections) == (0, 0, CLIENTS)
    assert "Traceback" not in log
