"""mitmdump flows/s with the pixel addon answering locally, against a bare mitmdump.

Both are mitmdump in reverse mode (the upstream is never contacted: both answer
every request themselves) with ``--flow-detail 0``, loaded with the same distinct
pixel URLs by the same client (wrk, keep-alive), in interleaved rounds:

- bare: a trivial script that sets a GIF response (bench/mitm_gif_answer.py);
- ours: addons/pixel_capture.py with ``pixel_answer=true``, records kept in the
  session's memory (the default), and again with ``pixel_store=sqlite:///...``.

Target: at least 0.9x the bare mitmdump's flows/s.

A second pair runs both at mitmdump's default ``--flow-detail 1``, as a person
who just runs ``mitmdump -s addons/pixel_capture.py`` gets it: mitmdump then
prints a line for every flow, bare or not. With ``--flow-detail 0`` the bare
mitmdump prints nothing while the addon still logs its one line a pixel, which
mitmproxy 12 both prints and dispatches to every addon as a legacy ``add_log``
event: the strict pair's gap is mostly that line, which the addon must write.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

from bench.payloads import segment_template
from bench.processes import BenchError
from bench.results import Row, at_least, median_ratio
from bench.rounds import ServerUnderLoad, kept_row, run_rounds, store_message_ids
from bench.settings import Settings

NAME = "mitm"
ROOT = Path(__file__).resolve().parent.parent
TARGET = at_least(0.9)
READY = r"(?i)listening at 127\.0\.0\.1:(\d+)"


def mitmdump_path() -> str:
    beside = Path(sys.executable).parent / "mitmdump"
    if beside.exists():
        return str(beside)
    found = shutil.which("mitmdump")
    if found is None:
        raise BenchError("mitmdump not found: pip install -e '.[mitmproxy]' (Python 3.12+)")
    return found


def mitmdump_argv(confdir: Path, script: Path, *options: str, flow_detail: int = 0) -> list[str]:
    argv = [
        mitmdump_path(),
        "--mode",
        "reverse:http://127.0.0.1:9",  # never contacted: both answer locally
        "--listen-host",
        "127.0.0.1",
        "-p",
        "0",
        "--flow-detail",
        str(flow_detail),
        "--set",
        f"confdir={confdir}",
        "--set",
        "connection_strategy=lazy",
        "-s",
        str(script),
    ]
    for option in options:
        argv += ["--set", option]
    return argv


def run(settings: Settings) -> list[Row]:
    template = segment_template()
    confdir = settings.workdir / "mitmproxy-conf"
    store_url = f"sqlite:///{settings.workdir / 'mitm.sqlite3'}"
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    addon = ROOT / "addons" / "pixel_capture.py"

    def mitmdump(name: str, script: Path, *options: str, flow_detail: int = 0) -> ServerUnderLoad:
        # A confdir each: mitmdumps started together in one fresh confdir race
        # to create its CA, and one may read the other's half-written PEM.
        own_confdir = confdir / name.replace(" ", "-").replace(",", "")
        argv = mitmdump_argv(own_confdir, script, *options, flow_detail=flow_detail)
        return ServerUnderLoad(name, argv, READY, env, cwd=settings.workdir)

    gif_script = ROOT / "bench" / "mitm_gif_answer.py"

    servers = {
        "bare": mitmdump("bare mitmdump", gif_script),
        "ours": mitmdump("pixel addon", addon, "pixel_answer=true"),
        "ours_sqlite": mitmdump(
            "pixel addon + sqlite", addon, "pixel_answer=true", f"pixel_store={store_url}"
        ),
        "bare_default": mitmdump("bare mitmdump, flow-detail 1", gif_script, flow_detail=1),
        "ours_default": mitmdump(
            "pixel addon, flow-detail 1", addon, "pixel_answer=true", flow_detail=1
        ),
    }
    seconds = settings.pick(5.0, 3.0, 1.0)
    rounds = settings.pick(4, 3, 1)
    run_rounds(
        servers,
        settings,
        template,
        seconds=seconds,
        warmup=settings.pick(2.0, 1.0, 0.5),
        rounds=rounds,
        bench=NAME,
    )
    rows = []
    for key, bare_key, label in [
        ("ours", "bare", "pixel addon, pixel_answer (records in memory)"),
        ("ours_sqlite", "bare", "pixel addon, pixel_answer, pixel_store=sqlite"),
        (
            "ours_default",
            "bare_default",
            "pixel addon, pixel_answer, both at the default --flow-detail 1",
        ),
    ]:
        ours, bare = servers[key], servers[bare_key]
        ratio, samples = median_ratio(ours.rates, bare.rates)
        rows.append(
            Row(
                bench=NAME,
                name=f"{label} vs bare mitmdump",
                ours=statistics.median(ours.rates),
                baseline=statistics.median(bare.rates),
                unit="flows/s",
                ratio=ratio,
                target=TARGET,
                baseline_name="GIF script",
                note=f"p99 {ours.p99_ms:.1f} ms vs {bare.p99_ms:.1f} ms; {rounds}x{seconds:g}s",
                samples=samples,
            )
        )
    rows.append(kept_row(NAME, servers["ours_sqlite"], store_message_ids(store_url)))
    return rows
