"""``python -m bench [--quick | --smoke] [--only NAME ...]``: run, print the table.

See bench/README.md for what each benchmark measures and against what.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.machine import describe
from bench.processes import BenchError
from bench.results import Row, render_table, write_json
from bench.settings import Settings

# In the order they run: the cheap in-process ones first.
BENCHMARKS = ["core", "wsgi", "http", "asgi", "mitm", "stores"]
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./dev bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs (about 3 minutes)")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="tiny counts and a Python HTTP client instead of wrk: checks the plumbing only",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="write the results here (default: bench/results/<date>-<mode>.json)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    chosen = [name for name in BENCHMARKS if not args.only or name in args.only]
    machine = describe()
    print(" | ".join(f"{k}: {v}" for k, v in machine.items()), flush=True)
    rows: list[Row] = []
    failed: list[str] = []
    began = time.monotonic()
    json_path = args.json.resolve() if args.json else None
    home = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="pixel-bench-") as tmp:
        # Whatever a component writes relative to the working directory (the
        # recorder's default spool, say) lands in the run's temporary directory.
        os.chdir(tmp)
        for name in chosen:
            settings = Settings(mode=mode, workdir=Path(tmp) / name)
            settings.workdir.mkdir()
            started = time.monotonic()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                module = importlib.import_module(f"bench.{name}")
                got = module.run(settings)
            except (BenchError, ImportError) as e:
                failed.append(name)
                print(f"[bench] {name} FAILED: {e}", file=sys.stderr, flush=True)
                continue
            except Exception:
                failed.append(name)
                traceback.print_exc()
                continue
            rows.extend(got)
            print(
                f"[bench] {name} done in {time.monotonic() - started:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        os.chdir(home)
    machine["took"] = f"{time.monotonic() - began:.0f}s"
    machine["mode"] = mode
    print()
    print(render_table(rows))
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = json_path or RESULTS / f"{stamp}-{mode}.json"
    write_json(rows, path, {**machine, "benchmarks": chosen, "failed": failed})
    print(f"\n{mode} run, {machine['took']}; results in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
