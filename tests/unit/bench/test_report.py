"""The suite's tables, target checks, document splicing and plots, on made-up figures."""

from __future__ import annotations

from pathlib import Path

import pytest
from suite import docs, report
from suite.model import (
    BORG,
    G1,
    G2F,
    G2I,
    G3A,
    G4,
    G5,
    KURA_IMAGE,
    KURA_IMAGE_RESTORE,
    NBDCOPY,
    VNB_COPY,
    Results,
    Row,
)

MIB = 1 << 20
GIB = 1 << 30


def fake() -> Results:
    r = Results(context={"profile": "fake", "cpus": 2, "accel": "tcg", "cold_cache": True,
                         "suite_seconds": 600.0})
    r.add(Row(G1, "kura", "kura", [2.0, 1.8, 2.4], GIB, stored=600 * MIB, rss=120 * MIB))
    r.add(Row(G1, VNB_COPY, "peer", [6.0], GIB, stored=700 * MIB, rss=200 * MIB))
    r.add(Row(G1, NBDCOPY, "limit", [1.6], GIB, rss=40 * MIB))
    r.add(Row(G1, KURA_IMAGE, "kura-alt", [3.0], GIB, stored=590 * MIB, rss=100 * MIB))
    r.add(Row(G1, BORG, "peer", [7.0], GIB, stored=589 * MIB, rss=90 * MIB))
    r.add(Row(G3A, "kura", "kura", [2.0], GIB, rss=100 * MIB))
    r.add(Row(G3A, KURA_IMAGE_RESTORE, "kura-alt", [2.5], GIB, rss=100 * MIB))
    r.add(Row(G3A, "virtnbdrestore", "peer", [5.0], GIB, rss=150 * MIB))
    r.add(Row(G2F, "kura", "kura", [3.0], GIB, rss=120 * MIB))
    r.add(Row(G2I, "kura", "kura", [0.6], 82 * MIB, read=328 * MIB, rss=400 * MIB))
    r.add(Row(G4, "kura", "kura", [10.0], 5 * GIB, stored=700 * MIB, rss=120 * MIB))
    r.add(Row(G4, "restic backup (raw files)", "peer", [12.0], 5 * GIB, stored=650 * MIB,
              rss=130 * MIB))
    r.skipped[G5] = "not measured: no server"
    for virtual, alloc, secs, series in ((GIB, 256 * MIB, 1.0, "sparse"),
                                         (16 * GIB, 256 * MIB, 1.2, "sparse"),
                                         (16 * GIB, 4 * GIB, 12.0, "proportional")):
        r.scaling.append({"virtual": virtual, "allocated": alloc, "seconds": secs,
                          "rss": 120 * MIB, "limit_seconds": secs / 2, "series": series})
    return r


def verdicts(r: Results) -> dict[str, bool | None]:
    return {f"{t.issue}: {t.target}": t.holds for t in report.targets(r)}


def test_row_median_spread_throughput() -> None:
    row = fake().rows[0]
    assert row.seconds == 2.0
    assert row.spread == (1.8, 2.4)
    assert row.throughput == GIB / 2.0
    with pytest.raises(ValueError):
        Row(G1, "x", "boss", [1.0], 1)


def test_ratios_are_taken_within_a_group() -> None:
    r = fake()
    assert r.ratio(r.find(G1, VNB_COPY)) == pytest.approx(3.0)  # type: ignore[arg-type]
    assert r.ratio(r.find(G1, NBDCOPY)) == pytest.approx(2.0 / 1.6)  # type: ignore[arg-type]
    assert r.ratio(r.find(G1, "kura")) is None  # type: ignore[arg-type]
    table = report.ratio_table(r)
    assert f"{VNB_COPY}: **3.00**" in table
    assert "restic backup (raw files): **1.20**" in table
    assert "restic backup (raw files): 1.08" in table  # stored 700 ÷ 650


def test_targets_hold_and_fail_as_measured() -> None:
    v = verdicts(fake())
    assert v["2: image backup ≥2× faster than borg create zstd,3"] is True  # 7/3
    assert v["2: repository no larger than borg's"] is False  # 590 > 589
    assert v["2: restore at least as fast as backup"] is True
    assert v["4: full backup of a running VM ≥3× faster than virtnbdbackup -l copy -z"] is True
    assert v["4: … within 1.5× of reading the allocated data over the same NBD export"] is True
    assert v["4: incremental after 1% change ≤10% of the full's time"] is False  # 0.6/3
    assert v["4: peak memory < 300 MB"] is False  # the incremental's 400 MiB
    assert v["4: restore ≥2× faster than virtnbdrestore (scenario 2 chain)"] is None
    assert v["5: server CPU < 20% of total"] is None
    assert v[f"6: {G4}: stores no more than restic backup (raw files)"] is False
    assert v["6: scaling: same allocated data on 1–16 GiB disks costs the same (max/min ≤ 1.5)"]
    assert v["6: the suite finishes within 15 minutes"] is True


def test_tables_render_every_row() -> None:
    r = fake()
    main = report.main_table(r)
    assert main.count("\n") == 2 + len(r.rows)
    assert "2.00 (1.80–2.40)" in main
    assert "16 GiB | 4,096 MiB | proportional" in report.scaling_table(r)
    text = report.console_report(r)
    assert "not measured: no server" in text


def test_docs_splice_keeps_hand_written_text() -> None:
    block = docs.generated_block(fake(), plots_written=False)
    assert block.startswith(docs.BEGIN) and block.rstrip().endswith(docs.END)
    doc = "# Benchmarks\n\nintro\n\n" + block + "\n## Notes by others\nkeep me\n"
    again = docs.splice(doc, docs.generated_block(Results(), plots_written=False))
    assert "intro" in again and "keep me" in again
    assert again.count(docs.BEGIN) == 1 and "1 full backup" not in again
    assert docs.splice("# B\n\nold text\n", block).startswith("# B\n\nold text\n\n" + docs.BEGIN)


def test_results_round_trip_and_plots(tmp_path: Path) -> None:
    r = fake()
    again = Results.from_json(r.to_json())
    assert report.main_table(again) == report.main_table(r)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhow to rerun\n")
    docs.write(r, tmp_path)
    text = doc.read_text()
    assert "how to rerun" in text and "bench-throughput.png" in text
    for png in (docs.THROUGHPUT_PNG, docs.SCALING_PNG):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_round_ratio_spread() -> None:
    r = Results()
    r.add(Row(G1, "kura", "kura", [2.0, 4.0], GIB))
    peer = r.add(Row(G1, VNB_COPY, "peer", [6.0, 4.0], GIB))
    limit = r.add(Row(G1, NBDCOPY, "limit", [1.0, 1.0], GIB))
    assert r.ratio_spread(peer) == (1.0, 3.0)
    assert r.ratio_spread(limit) == (2.0, 4.0)
    assert "(rounds 1.00–3.00)" in report.main_table(r)
