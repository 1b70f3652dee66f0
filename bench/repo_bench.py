#!/usr/bin/env python3
"""Repository benchmark (issue 2): kura image backup/restore against borg.

Builds a synthetic raw image (default 2 GiB: 512 MiB random, 512 MiB
compressible text, 1 GiB zeros), then, each in a fresh repository and as a
separate process whose peak RSS is taken from ``wait4``:

- ``kura backup --image`` into an encrypted (AES-256-GCM), zstd-3 repository;
- ``kura restore --output`` of that restore point (checked against the image);
- ``borg create --compression zstd,3`` into a ``repokey`` repository
  (AES-256-CTR + HMAC-SHA256: the same primitives class as kura's AES-GCM +
  HMAC-SHA256 chunk ids) and ``borg extract`` of that archive.

Each command runs under GNU time: wall seconds, CPU seconds (user + system:
what the work costs whatever else the machine runs) and peak RSS. Prints a
Markdown table (and ``--json`` figures). Usage::

    .venv/bin/python bench/repo_bench.py [--workdir DIR] [--scale 1.0] [--json FILE]

``--scale 0.25`` runs the same layout at a quarter of the size (quick check).
Page cache is dropped before each run when possible (root), so reads come from disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20
HERE = Path(__file__).resolve().parent
KURA = str(Path(sys.executable).with_name("kura"))
PASSPHRASE = "bench-passphrase"


def make_image(path: Path, scale: float) -> None:
    """512 MiB random, 512 MiB text, 1 GiB zeros (times ``scale``), deterministic."""
    part = int(512 * MIB * scale) // MIB * MIB
    stamp = path.with_suffix(".done")
    if path.exists() and stamp.exists() and stamp.read_text() == str(part):
        return
    rng = np.random.default_rng(20261127)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 11)))
             for _ in range(5000)]
    vocab = np.array([w.encode() for w in words], dtype=object)
    with open(path, "wb") as f:
        left = part
        while left:  # random
            n = min(left, 16 * MIB)
            f.write(rng.bytes(n))
            left -= n
        left = part
        line = 0
        while left:  # text: log-like lines of random words, unique everywhere
            out = []
            size = 0
            while size < 4 * MIB:
                ws = vocab[rng.integers(0, len(vocab), 12)]
                text = b"%08d %s\n" % (line, b" ".join(ws))
                out.append(text)
                size += len(text)
                line += 1
            block = b"".join(out)[: min(left, 4 * MIB)]
            f.write(block)
            left -= len(block)
        f.truncate(4 * part)  # the rest: zeros (a hole)
    stamp.write_text(str(part))


def drop_caches() -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (bytes) of one command.

    The command runs under GNU time: Linux seeds a child's ru_maxrss with its
    parent's high-water mark, so a child forked straight from a large process
    would report that process's size.
    """
    drop_caches()
    t0 = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", *argv], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    seconds = time.monotonic() - t0
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err}")
    _wall, user, system, maxrss_kib = err.strip().splitlines()[-1].split()
    return {"seconds": seconds, "cpu": float(user) + float(system),
            "rss": int(maxrss_kib) * 1024}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * MIB):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/kura-repo-bench"))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--skip-borg", action="store_true")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    image = work / "image.raw"
    make_image(image, args.scale)
    size = image.stat().st_size
    want = sha256(image)
    env = dict(os.environ, KURA_PASSPHRASE=PASSPHRASE, BORG_PASSPHRASE=PASSPHRASE,
               BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
               BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_BASE_DIR=str(work / "borg-home"))
    results: dict[str, dict[str, float]] = {}
    load = os.getloadavg()[0]

    repo = work / "kura-repo"
    shutil.rmtree(repo, ignore_errors=True)
    env["KURA_REPO"] = str(repo)
    subprocess.run([KURA, "repo", "init"], env=env, check=True, stdout=subprocess.DEVNULL)
    results["kura backup"] = run([KURA, "backup", "--image", str(image), "--name", "bench"],
                                 env)
    results["kura backup"]["repo_bytes"] = du(repo)
    out = work / "restored.raw"
    out.unlink(missing_ok=True)
    results["kura restore"] = run([KURA, "restore", "bench", "--output", str(out)], env)
    if sha256(out) != want:
        raise SystemExit("kura restore differs from the image")
    out.unlink()
    again = run([KURA, "backup", "--image", str(image), "--name", "bench"], env)
    again["repo_bytes"] = du(repo)
    results["kura backup (again, deduplicated)"] = again

    if not args.skip_borg:
        brepo = work / "borg-repo"
        shutil.rmtree(brepo, ignore_errors=True)
        subprocess.run(["borg", "init", "--encryption", "repokey", str(brepo)], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results["borg create"] = run(["borg", "create", "--compression", "zstd,3",
                                      f"{brepo}::a", str(image)], env)
        results["borg create"]["repo_bytes"] = du(brepo)
        ext = work / "borg-extract"
        shutil.rmtree(ext, ignore_errors=True)
        ext.mkdir()
        results["borg extract"] = run(["borg", "extract", "--sparse", f"{brepo}::a"], env,
                                      cwd=ext)
        shutil.rmtree(ext, ignore_errors=True)

    print(f"image: {size / MIB:.0f} MiB (random {size / 4 / MIB:.0f} MiB, text "
          f"{size / 4 / MIB:.0f} MiB, zeros {size / 2 / MIB:.0f} MiB); {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at the start\n")
    print("| run | seconds | MiB/s | CPU seconds | peak RSS MiB | repository bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        repo_bytes = f"{r['repo_bytes']:,}" if "repo_bytes" in r else ""
        print(f"| {name} | {r['seconds']:.2f} | {size / MIB / r['seconds']:.0f} | "
              f"{r['cpu']:.2f} | {r['rss'] / MIB:.0f} | {repo_bytes} |")
    if "borg create" in results:
        ratio = results["borg create"]["seconds"] / results["kura backup"]["seconds"]
        print(f"\nkura backup is {ratio:.1f}x faster than borg create; repository "
              f"{results['kura backup']['repo_bytes'] / results['borg create']['repo_bytes']:.2f}"
              "x borg's size")
    if args.json:
        args.json.write_text(json.dumps({"image_bytes": size, "load": load,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
