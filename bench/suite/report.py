"""Tables and target checks from a run's :class:`~suite.model.Results`.

Everything here is a pure function of the figures (no measuring), so the
unit tests feed it made-up results. Units: MiB = 2^20 bytes for sizes and
throughput; the "300 MB" memory targets are checked against 300 x 10^6 bytes.

The target checks encode the related targets of issues 2, 4, 5 and 6
exactly as written in those issues, each with the measured value and a
verdict: ``holds``, ``does not hold``, or ``not measured``.
"""

from __future__ import annotations

from dataclasses import dataclass

from suite.model import (
    BORG,
    G1,
    G2F,
    G2I,
    G3A,
    G3B,
    G4,
    G5,
    G6,
    KURA_IMAGE,
    KURA_IMAGE_RESTORE,
    NBDCOPY,
    ONE_BY_ONE,
    SERVER_JOB,
    VNB_COPY,
    Results,
    Row,
)

MIB = 1 << 20
MEMORY_LIMIT = 300_000_000
FASTER = " (peer time ÷ kura time)"



def mib(n: float | None) -> str:
    return "" if n is None else f"{n / MIB:,.0f}"


def secs(row: Row) -> str:
    if len(row.samples) > 1:
        lo, hi = row.spread
        return f"{row.seconds:.2f} ({lo:.2f}–{hi:.2f})"
    return f"{row.seconds:.2f}"


def ratio_text(results: Results, row: Row) -> str:
    r = results.ratio(row)
    if r is None:
        return "—" if row.role == "kura" else ""
    spread = results.ratio_spread(row)
    per_round = f" (rounds {spread[0]:.2f}–{spread[1]:.2f})" if spread else ""
    if row.role in ("limit", "derived"):
        return f"kura {r:.2f}× this{per_round}"
    return f"{r:.2f}×{per_round}"


def main_table(results: Results, *, scaling: bool = False) -> str:
    """The Markdown table of every row (scaling rows only when ``scaling``)."""
    head = ("| scenario | tool | time s | MiB/s | tool time ÷ kura time | stored MiB | "
            "read MiB | peak RSS MiB | note |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in sorted(results.rows, key=lambda r: r.group):  # stable: run order inside a group
        if r.group.startswith(G6) != scaling:
            continue
        lines.append(f"| {r.group} | {r.tool} | {secs(r)} | {r.throughput / MIB:,.0f} | "
                     f"{ratio_text(results, r)} | {mib(r.stored)} | {mib(r.read)} | "
                     f"{mib(r.rss)} | {r.note} |")
    return head + "\n".join(lines) + "\n"


def ratio_table(results: Results) -> str:
    """Per scenario: how many times faster kura is than each peer, and its distance to the
    limit (kura time ÷ limit time)."""
    lines = ["| scenario | kura s | other time ÷ kura time (above 1: kura faster) | "
             "kura time ÷ limit time | kura stored ÷ peer stored |", "|---|---:|---|---|---|"]
    for g in sorted(results.groups()):
        if g.startswith(G6):
            continue
        k = results.kura(g)
        if k is None:
            continue
        peers, limits, stored = [], [], []
        for r in results.group(g):
            ratio = results.ratio(r)
            if ratio is None:
                continue
            if r.role in ("peer", "kura-alt"):
                peers.append(f"{r.tool}: **{ratio:.2f}**")
                if k.stored and r.stored:
                    stored.append(f"{r.tool}: {k.stored / r.stored:.2f}")
            elif r.role in ("limit", "derived"):
                limits.append(f"{r.tool}: {ratio:.1f}")
        lines.append(f"| {g} | {k.seconds:.2f} | {'; '.join(peers)} | {'; '.join(limits)} | "
                     f"{'; '.join(stored)} |")
    return "\n".join(lines) + "\n"


def scaling_table(results: Results) -> str:
    lines = ["| disk (virtual) | allocated | series | kura s | peak RSS MiB | nbdcopy s | "
             "kura ÷ nbdcopy |", "|---:|---:|---|---:|---:|---:|---:|"]
    for p in results.scaling:
        lines.append(f"| {p['virtual'] / (1 << 30):g} GiB | {p['allocated'] / MIB:,.0f} MiB | "
                     f"{p['series']} | {p['seconds']:.2f} | {p['rss'] / MIB:,.0f} | "
                     f"{p['limit_seconds']:.2f} | "
                     f"{p['seconds'] / p['limit_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Target:
    issue: str
    target: str
    measured: str
    holds: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "holds", False: "**does not hold**", None: "not measured"}[self.holds]


def _rss_check(rows: list[Row | None]) -> tuple[str, bool | None]:
    got = [r for r in rows if r is not None and r.rss is not None]
    if not got:
        return "—", None
    worst = max(got, key=lambda r: r.rss or 0)
    return (f"max {worst.rss / 1e6:,.0f} MB ({worst.group}: {worst.tool})",  # type: ignore[operator]
            all((r.rss or 0) < MEMORY_LIMIT for r in got))


def targets(results: Results) -> list[Target]:
    f = results.find
    out: list[Target] = []

    def ratio_target(issue: str, text: str, num: Row | None, den: Row | None,
                     ok: float, *, at_least: bool, what: str) -> None:
        if num is None or den is None:
            out.append(Target(issue, text, "—", None))
            return
        value = num.seconds / den.seconds
        holds = value >= ok if at_least else value <= ok
        out.append(Target(issue, text, f"{value:.2f}{what}", holds))

    kimg, borg = f(G1, KURA_IMAGE), f(G1, BORG)
    ratio_target("2", "image backup ≥2× faster than borg create zstd,3", borg, kimg, 2.0,
                 at_least=True, what=FASTER)
    if kimg and borg and kimg.stored and borg.stored:
        out.append(Target("2", "repository no larger than borg's",
                          f"{kimg.stored / borg.stored:.2f}× borg's "
                          f"({mib(kimg.stored)} vs {mib(borg.stored)} MiB)",
                          kimg.stored <= borg.stored))
    else:
        out.append(Target("2", "repository no larger than borg's", "—", None))
    krest = f(G3A, KURA_IMAGE_RESTORE)
    ratio_target("2", "restore at least as fast as backup", krest, kimg, 1.0, at_least=False,
                 what="× the backup's time")
    m, h = _rss_check([kimg, krest])
    out.append(Target("2", "peak memory < 300 MB", m, h))

    k1, vnb = f(G1, "kura"), f(G1, VNB_COPY)
    ratio_target("4", "full backup of a running VM ≥3× faster than virtnbdbackup -l copy -z",
                 vnb, k1, 3.0, at_least=True, what=FASTER)
    ratio_target("4", "… within 1.5× of reading the allocated data over the same NBD export",
                 k1, f(G1, NBDCOPY), 1.5, at_least=False, what="× the read time")
    ratio_target("4", "incremental after 1% change ≤10% of the full's time", f(G2I, "kura"),
                 f(G2F, "kura"), 0.10, at_least=False, what=" of the full's time")
    ratio_target("4", "restore ≥2× faster than virtnbdrestore (scenario 1)",
                 f(G3A, "virtnbdrestore"), f(G3A, "kura"), 2.0, at_least=True, what=FASTER)
    ratio_target("4", "restore ≥2× faster than virtnbdrestore (scenario 2 chain)",
                 f(G3B, "virtnbdrestore"), f(G3B, "kura"), 2.0, at_least=True, what=FASTER)
    m, h = _rss_check([f(g, "kura") for g in (G1, G2F, G2I, G3A, G3B)])
    out.append(Target("4", "peak memory < 300 MB", m, h))

    g5 = results.group(G5)
    if not g5:
        why = results.skipped.get(G5, "not measured")
        out.append(Target("5", "8 VMs over both nodes in one server job at least as fast as "
                          "one by one standalone", why, None))
        out.append(Target("5", "server CPU < 20% of total", why, None))
    else:
        job, alone = f(G5, SERVER_JOB), f(G5, ONE_BY_ONE)
        ratio_target("5", "VMs over both nodes in one server job at least as fast as one "
                     "by one standalone", job, alone, 1.0, at_least=False,
                     what="× the one-by-one time")
        cpu = results.context.get("server_cpu_share")
        out.append(Target("5", "server CPU < 20% of total",
                          f"{cpu:.0%}" if isinstance(cpu, float) else "—",
                          cpu < 0.20 if isinstance(cpu, float) else None))

    for g in results.groups():
        if g.startswith(G6):
            continue
        k = results.kura(g)
        peers = [r for r in results.group(g) if r.role == "peer"]
        if k is None or not peers:
            continue
        slowest = min(r.seconds / k.seconds for r in peers)
        out.append(Target("6", f"{g}: faster than every peer",
                          f"lowest peer time ÷ kura time: {slowest:.2f}", slowest > 1.0))
        with_rss = [r for r in peers if r.rss is not None]
        if k.rss is not None and with_rss:
            leanest = min(with_rss, key=lambda r: r.rss or 0)
            out.append(Target("6", f"{g}: leaner (peak memory) than every peer",
                              f"kura {mib(k.rss)} MiB, least peer {mib(leanest.rss)} MiB "
                              f"({leanest.tool})", k.rss < (leanest.rss or 0)))
    k4 = results.kura(G4)
    for r in results.group(G4):
        if k4 is None or r.role != "peer" or not r.stored or not k4.stored:
            continue
        out.append(Target("6", f"{G4}: stores no more than {r.tool}",
                          f"{k4.stored / r.stored:.2f}× its size ({mib(k4.stored)} vs "
                          f"{mib(r.stored)} MiB)", k4.stored <= r.stored))
    sparse = [p for p in results.scaling if p["series"] == "sparse"]
    if len(sparse) >= 2:
        t = max(p["seconds"] for p in sparse) / min(p["seconds"] for p in sparse)
        mem = max(p["rss"] for p in sparse) / min(p["rss"] for p in sparse)
        span = f"{sparse[0]['virtual'] / (1 << 30):g}–{sparse[-1]['virtual'] / (1 << 30):g} GiB"
        out.append(Target("6", f"scaling: same allocated data on {span} disks costs the same "
                          "(max/min ≤ 1.5)", f"time ×{t:.2f}, peak memory ×{mem:.2f}",
                          t <= 1.5 and mem <= 1.5))
    total = results.context.get("suite_seconds")
    if isinstance(total, float | int):
        out.append(Target("6", "the suite finishes within 15 minutes", f"{total / 60:.1f} min",
                          total <= 15 * 60))
    return out


def targets_summary(results: Results) -> str:
    ts = targets(results)
    held = sum(1 for t in ts if t.holds is True)
    failed = sum(1 for t in ts if t.holds is False)
    unknown = sum(1 for t in ts if t.holds is None)
    return (f"{held} of {len(ts)} target checks hold, {failed} do not"
            + (f", {unknown} not measured" if unknown else "") + ".")


def targets_table(results: Results) -> str:
    lines = ["| issue | target | measured | verdict |", "|---|---|---|---|"]
    for t in targets(results):
        lines.append(f"| {t.issue} | {t.target} | {t.measured} | {t.verdict} |")
    return "\n".join(lines) + "\n"


def context_text(results: Results) -> str:
    c = results.context
    cpu = c.get("cpu") or {}
    versions = c.get("versions") or {}
    parts = [f"- profile `{c.get('profile', '?')}`, {c.get('cpus', '?')} CPUs, guests under "
             f"{str(c.get('accel', '?')).upper()}, page cache dropped before every measured "
             "run" if c.get("cold_cache") else "- warm page cache"]
    if cpu:
        parts.append(f"- one core: keyed BLAKE3 {cpu['hash'] / MIB:,.0f} MiB/s, zstd-3 "
                     f"{cpu['compress'] / MIB:,.0f} MiB/s, AES-256-GCM "
                     f"{cpu['encrypt'] / MIB:,.0f} MiB/s, all three "
                     f"{cpu['pipeline'] / MIB:,.0f} MiB/s (sample compresses to "
                     f"{cpu['compressed_ratio']:.0%})")
    if versions:
        parts.append("- " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
    if "kura_tree" in c:
        parts.append(f"- kura measured from the working tree at {c['kura_tree']}")
    if "load_start" in c:
        parts.append(f"- machine load (1-minute load average, 2 cores): {c['load_start']:.1f} "
                     f"at the start, {c.get('load_end', float('nan')):.1f} at the end: other "
                     "engineers' tests share the machine")
    if "suite_seconds" in c:
        parts.append(f"- whole run: {c['suite_seconds'] / 60:.1f} min"
                     + (f", finished {c['finished']}" if "finished" in c else ""))
    return "\n".join(parts) + "\n"


def skipped_text(results: Results) -> str:
    if not results.skipped:
        return ""
    return "\n".join(f"- **{k}**: {v}" for k, v in results.skipped.items()) + "\n"


def console_report(results: Results) -> str:
    """What ``bench/run`` prints: the same tables as the document, in plain Markdown."""
    out = ["# kura benchmark", "", context_text(results), "## All runs", "",
           main_table(results), "## Ratios", "", ratio_table(results)]
    if results.scaling:
        out += ["## Scaling", "", scaling_table(results)]
    out += ["## Targets", "", targets_table(results)]
    if results.skipped:
        out += ["## Not measured / failed", "", skipped_text(results)]
    return "\n".join(out)
