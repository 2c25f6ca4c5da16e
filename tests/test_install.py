"""`pip install pixel-middleware` from a wheel of this checkout gives a working `serve`.

A real wheel (pip wheel, setuptools from pyproject's build-system), installed
into a fresh virtualenv with no extras; that venv's `pixel-middleware serve`
answers a pixel on a free port and its `events` reads the record back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# Building the wheel (setuptools fetched into an isolated build environment)
# and installing it into a fresh venv go through the package index: minutes
# on a loaded machine, not the suite's 120 s per test.
@pytest.mark.timeout(600)
def test_a_wheel_installs_a_serve_that_records_a_pixel(tmp_path: Path) -> None:
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist", ROOT)
    # setuptools' license deprecation banner (and any other warning) is gone.
    assert "Deprecat" not in built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("pixel_middleware-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for static in ("index.html", "collector.js", "collector.css", "favicon.svg"):
        assert f"pixel_middleware/static/{static}" in names
    assert any(name.endswith("licenses/LICENSE") for name in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    run(bin_dir / "python", "-m", "pip", "install", "-q", wheel)
    # Only the collector's dependencies: no test tools, frameworks or mitmproxy.
    listed = run(bin_dir / "python", "-m", "pip", "list", "--format=freeze").stdout
    installed = {line.split("==")[0].lower() for line in listed.split()}
    assert installed - {"pip", "setuptools"} == {
        "pixel-middleware",
        "werkzeug",
        "granian",  # serve's server (docs/benchmarks.md)
        "click",  # granian's
        "waitress",  # serve --server waitress
        "markupsafe",
        "msgspec",  # the record's JSON, exact with big integers (docs/benchmarks.md)
    }

    work = tmp_path / "work"
    work.mkdir()
    server = subprocess.Popen(
        [bin_dir / "pixel-middleware", "serve", "--port", "0", "--store", "./first.sqlite3"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        start = server.stdout.readline()
        assert start.startswith("Collecting pixels on http://127.0.0.1:")
        assert f"at {work}/first.sqlite3" in start
        url = start.split()[3]
        page = requests.get(url, timeout=30)
        assert page.status_code == 200
        assert "<html" in page.text.lower()
        assert requests.get(url + "static/collector.js", timeout=30).status_code == 200
        pixel = requests.get(
            url + "pixel/v1/track?writeKey=KEY&anonymousId=a-1&event=Installed", timeout=30
        )
        assert (pixel.status_code, pixel.text) == (200, "OK")
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert "Stopped: 1 pixel record(s) recorded in this run" in out
    assert err == ""  # no warning, at start or stop
    events = run(
        bin_dir / "pixel-middleware",
        "events",
        "--store",
        "first.sqlite3",
        "--format",
        "jsonl",
        cwd=work,
    )
    (line,) = events.stdout.splitlines()
    assert '"event":"Installed"' in line
    assert '"accepted":true' in line
