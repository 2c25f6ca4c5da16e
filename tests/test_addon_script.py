"""addons/pixel_capture.py, the script users pass to ``mitmdump -s``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import requests

with warnings.catch_warnings():
    # mitmproxy 12.2 builds its filter grammar at import with pyparsing names that
    # pyparsing 3.3 deprecates: not ours, and not an error in this project.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy import hooks
    from mitmproxy.addons import script

    from pixel_middleware.mitm import PixelCapture

pytestmark = pytest.mark.mitmproxy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "addons" / "pixel_capture.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")


def test_script_holds_one_addon_and_no_stray_hooks() -> None:
    module = script.load_script(str(SCRIPT))
    assert module is not None
    assert [type(addon) for addon in module.addons] == [PixelCapture]
    # mitmproxy calls any module-level name that is a hook's name.
    assert not set(vars(module)) & set(hooks.all_hooks)
    assert "mitmdump -s addons/pixel_capture.py" in (module.__doc__ or "")


# Hides the installed package from mitmproxy's Python, as in a mitmproxy binary
# or a pipx install: `import pixel_middleware` fails unless it is found under
# $PIXEL_ALLOWED_ROOT (the checkout copy the script is run from). At exit it
# prints which pixel_middleware modules were loaded, and from where.
SITECUSTOMIZE = textwrap.dedent(
    """
    import atexit, importlib.machinery, json, os, sys

    ALLOWED = os.environ["PIXEL_ALLOWED_ROOT"]

    class HideInstalledPackage:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name != "pixel_middleware":
                return None
            allowed = [entry for entry in sys.path if entry == ALLOWED]
            spec = importlib.machinery.PathFinder.find_spec(name, allowed)
            if spec is None:
                raise ModuleNotFoundError("No module named 'pixel_middleware'", name=name)
            return spec

    sys.meta_path.insert(0, HideInstalledPackage)

    @atexit.register
    def report():
        loaded = {
            name: getattr(module, "__file__", None)
            for name, module in sorted(sys.modules.items())
            if name.split(".")[0] == "pixel_middleware"
        }
        print("LOADED " + json.dumps(loaded), flush=True)
    """
)


def test_script_runs_from_a_checkout_when_the_package_is_not_installed(tmp_path: Path) -> None:
    """What it proves: a mitmproxy whose Python cannot import the installed package
    loads the addon from the checkout the script lives in (the script puts the
    checkout root on sys.path), and the addon works there without importing any of
    the werkzeug-based modules (middleware, collector, CLI)."""
    checkout = tmp_path / "checkout"
    shutil.copytree(
        ROOT / "pixel_middleware",
        checkout / "pixel_middleware",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (checkout / "addons").mkdir()
    shutil.copy(SCRIPT, checkout / "addons")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PIXEL_ALLOWED_ROOT": str(checkout.resolve()),
        "PYTHONUNBUFFERED": "1",
    }

    # The premise: this Python cannot import the package.
    premise = subprocess.run(
        [sys.executable, "-c", "import pixel_middleware"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "No module named 'pixel_middleware'" in premise.stderr

    proc = subprocess.Popen(
        [
            str(MITMDUMP),
            "--listen-host",
            "127.0.0.1",
            "-p",
            "0",
            "--flow-detail",
            "0",
            "--set",
            f"confdir={tmp_path}/conf",
            "--set",
            "pixel_answer=true",
            "-s",
            str(checkout / "addons" / "pixel_capture.py"),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "listening at 127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1].rstrip(".\n"))
                break
        else:
            pytest.fail("mitmdump exited:\n" + "".join(lines))
        with requests.Session() as client:
            client.trust_env = False
            client.proxies = {"http": f"http://127.0.0.1:{port}"}
            answer = client.get(
                "http://pixels.invalid/pixel/v1/page?writeKey=k&anonymousId=a",
                headers={"Connection": "close"},
            )
        assert (answer.status_code, answer.text) == (200, "OK")
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        lines.append(rest)
    output = "".join(lines)
    assert (
        "pixel rudderstack page anonymousId=a writeKey=k accepted upstream answered locally"
        " host=pixels.invalid"
    ) in output
    loaded = json.loads(output.split("LOADED ", 1)[1].splitlines()[0])
    assert "pixel_middleware.mitm" in loaded
    assert all(Path(file).is_relative_to(checkout.resolve()) for file in loaded.values()), loaded
    # (mitmproxy imports werkzeug itself, for its onboarding app: only our own
    # werkzeug-based modules can be checked here.)
    assert not {
        "pixel_middleware.middleware",
        "pixel_middleware.collector",
        "pixel_middleware.cli",
    } & set(loaded)
