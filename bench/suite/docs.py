"""Writing a run's figures into ``docs/benchmarks.md`` and its PNG plots.

The document is partly hand-written (how to rerun, what is measured, the
component engineers' own notes) and partly generated. Only the text between
the two marker lines below is replaced by a run, so everything else in the
file survives, whoever wrote it. A file without the markers gets the
generated block appended at its end.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from suite import plots, report
from suite.model import Results

BEGIN = "<!-- bench/run: generated figures begin (do not edit by hand) -->"
END = "<!-- bench/run: generated figures end -->"
THROUGHPUT_PNG = "bench-throughput.png"
SCALING_PNG = "bench-scaling.png"


def generated_block(results: Results, *, plots_written: bool) -> str:
    stamp = results.context.get("finished") or dt.datetime.now(dt.UTC).strftime(
        "%Y-%m-%d %H:%M UTC")
    parts = [BEGIN, "", f"### Latest full run ({stamp})", "", report.context_text(results),
             "#### Ratios (measured side by side in this run)", "",
             report.ratio_table(results), "#### Targets", "", report.targets_summary(results), "",
             report.targets_table(results),
             "#### Every measurement", "", report.main_table(results)]
    if plots_written:
        parts += ["", f"![throughput per scenario]({THROUGHPUT_PNG})", ""]
    if results.scaling:
        parts += ["#### Scaling (scenario 6)", "", report.scaling_table(results)]
        if plots_written:
            parts += ["", f"![scaling]({SCALING_PNG})", ""]
    if results.skipped:
        parts += ["#### Not measured or failed in this run", "", report.skipped_text(results)]
    parts.append(END)
    return "\n".join(parts) + "\n"


def splice(existing: str, block: str) -> str:
    """``existing`` with the generated block replaced (or appended)."""
    if BEGIN in existing and END in existing:
        head, _, rest = existing.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + block.rstrip("\n") + tail
    return existing.rstrip("\n") + "\n\n" + block


def write(results: Results, docs_dir: Path) -> Path:
    """Plots into ``docs_dir`` and the generated block into ``benchmarks.md``."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    plots.throughput(results, docs_dir / THROUGHPUT_PNG)
    if results.scaling:
        plots.scaling(results, docs_dir / SCALING_PNG)
    doc = docs_dir / "benchmarks.md"
    existing = doc.read_text() if doc.exists() else "# Benchmarks\n"
    doc.write_text(splice(existing, generated_block(results, plots_written=True)))
    return doc
