"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- ``throughput``: one panel per scenario, a horizontal bar per tool with its
  throughput in MiB/s of the scenario's data (allocated or changed bytes),
  coloured by role: kura, another kura path, peers, the measured read limit,
  the computed CPU floor. Each panel has its own scale: an incremental's
  throughput of changed data is not comparable with a full's.
- ``scaling``: kura's full-backup time (with the NBD read limit, dashed) and
  its peak memory against the disk's virtual size, for the series with the
  same allocated data ("sparse") and the series whose allocated data grows
  with the disk ("proportional"); each point is labelled with its allocated
  size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from suite.model import ROLES, Results

MIB = 1 << 20
COLOURS = {"kura": "#1f5fbf", "kura-alt": "#8fb3e8", "peer": "#9a9a9a", "limit": "#2e8b57",
           "derived": "#c9a227"}
LABELS = {"kura": "kura", "kura-alt": "kura (other path)", "peer": "peer",
          "limit": "read limit (measured)", "derived": "CPU floor (computed)"}


def throughput(results: Results, path: Path) -> Path:
    groups = sorted(g for g in results.groups() if not g.startswith("6 "))
    heights = [max(1, len(results.group(g))) for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 0.42 * sum(heights) + 1.1 * len(groups)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    handles: dict[str, Any] = {}
    for ax, g in zip(axes[:, 0], groups, strict=True):
        rows = sorted(results.group(g), key=lambda r: ROLES.index(r.role))[::-1]
        values = [r.throughput / MIB for r in rows]
        bars = ax.barh([r.tool for r in rows], values,
                       color=[COLOURS[r.role] for r in rows])
        for bar, r in zip(bars, rows, strict=True):
            handles.setdefault(r.role, bar)
        top = max(values) if values else 1.0
        for y, (v, r) in enumerate(zip(values, rows, strict=True)):
            ratio = results.ratio(r)
            extra = ""
            if ratio is not None:
                extra = (f"   (kura takes {ratio:.1f}× its time)" if r.role in ("limit", "derived")
                         else f"   (its time = {ratio:.2f}× kura's)")
            ax.text(v + top * 0.01, y, f"{v:,.0f}{extra}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.6)
        ax.set_title(g, loc="left", fontsize=10, fontweight="bold")
        ax.tick_params(axis="y", labelsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("MiB/s of the scenario's data (allocated, or changed for the "
                           "incremental); longer is faster")
    order = [role for role in ROLES if role in handles]
    fig.legend([handles[role] for role in order], [LABELS[role] for role in order],
               loc="upper right", fontsize=8, ncol=len(order), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling(results: Results, path: Path) -> Path:
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"sparse": ("o", "#1f5fbf"), "proportional": ("s", "#c0392b")}
    for series, (marker, colour) in styles.items():
        pts = sorted((p for p in results.scaling if p["series"] == series),
                     key=lambda p: p["virtual"])
        if not pts:
            continue
        xs = [p["virtual"] / (1 << 30) for p in pts]
        alloc = pts[-1]["allocated"] / MIB
        name = (f"same {alloc:,.0f} MiB allocated" if series == "sparse"
                else "allocated grows with the disk")
        ax_t.plot(xs, [p["seconds"] for p in pts], marker=marker, color=colour,
                  label=f"kura, {name}")
        ax_t.plot(xs, [p["limit_seconds"] for p in pts], marker=marker, color=colour,
                  linestyle="--", alpha=0.6, label=f"nbdcopy read limit, {name}")
        ax_m.plot(xs, [p["rss"] / MIB for p in pts], marker=marker, color=colour,
                  label=f"kura, {name}")
        for p, x in zip(pts, xs, strict=True):
            ax_t.annotate(f"{p['allocated'] / MIB:,.0f} MiB", (x, p["seconds"]),
                          textcoords="offset points", xytext=(4, 6), fontsize=7,
                          color=colour)
    sizes = sorted({p["virtual"] / (1 << 30) for p in results.scaling})
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("disk virtual size, GiB (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_ylabel("full backup time, s")
    ax_t.set_title("kura full backup time against disk size", fontsize=10)
    ax_m.set_ylabel("kura peak RSS, MiB")
    ax_m.set_title("peak memory of the backup process", fontsize=10)
    target = 300e6 / MIB  # issues 2 and 4: peak memory < 300 MB
    ax_m.axhline(target, color="#777777", linestyle=":", linewidth=1)
    ax_m.annotate("target: < 300 MB", (sizes[0] if sizes else 1, target),
                  textcoords="offset points", xytext=(2, 4), fontsize=7, color="#555555")
    top_m = max([p["rss"] / MIB for p in results.scaling] + [target])
    ax_m.set_ylim(0, top_m * 1.2)
    top_t = max([p["seconds"] for p in results.scaling] + [1.0])
    ax_t.set_ylim(0, top_t * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
