"""Command line of the suite: ``bench/run [--quick] [--only 1,2] [--no-docs] ...``.

Runs the scenarios, prints the tables, saves the figures as JSON
(``<workdir>/results-<profile>.json``) and, for a full run, writes
``docs/benchmarks.md`` and the PNG plots. ``--report FILE`` re-renders the
tables, document and plots from a saved JSON without measuring anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from suite import docs, measure, report
from suite.model import Results
from suite.scenarios import FULL, QUICK, Suite

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description="kura side by side with "
                                 "virtnbdbackup, borg and restic on the same lab VMs.")
    ap.add_argument("--quick", action="store_true",
                    help="quarter-size data, 4 job VMs, 3 clones, small scaling disks (~5 min)")
    ap.add_argument("--only", metavar="LIST",
                    help="comma-separated scenarios to run: 1 (with 3 and issue 2), 2, 4, 5, 6")
    ap.add_argument("--repeat", type=int, help="rounds of scenario 1's backups (spread)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/kura-bench-suite"),
                    help="lab, cached data, repositories (default: %(default)s)")
    ap.add_argument("--docs", dest="docs", action="store_true", default=None,
                    help="write docs/benchmarks.md and plots (default for a full run)")
    ap.add_argument("--no-docs", dest="docs", action="store_false")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache")
    ap.add_argument("--keep-lab", action="store_true", help="leave the bench lab running")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only render tables/docs from a saved results file")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    profile = QUICK if args.quick else FULL
    write_docs = args.docs if args.docs is not None else not args.quick
    if args.report is not None:
        results = Results.from_json(args.report.read_text())
    else:
        if args.repeat is not None:
            from dataclasses import replace

            profile = replace(profile, repeat=max(1, args.repeat))
        measure.SETTINGS.drop_caches = not args.warm
        only = set(args.only.split(",")) if args.only else None
        results = Results()
        args.workdir.mkdir(parents=True, exist_ok=True)
        args.workdir.chmod(0o755)
        suite = Suite(args.workdir, profile, results, log)
        try:
            suite.run_all(only)
        finally:
            results.context["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            results.context["cold_cache"] = not args.warm
            results.save(args.workdir / f"results-{profile.name}.json")
            if not args.keep_lab:
                try:
                    suite.lab.down()
                except Exception as exc:  # the figures are saved; say what is left over
                    log(f"lab teardown failed: {exc}")
    print(report.console_report(results))
    if write_docs:
        doc = docs.write(results, ROOT / "docs")
        log(f"wrote {doc} and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
