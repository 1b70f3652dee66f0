"""kura's benchmark suite (issue 6): kura and its peers on the same lab VMs, in one run.

``bench/run`` (``python -m suite`` with ``bench/`` on ``sys.path``) builds a
private two-node lab, prepares deterministic disk data, and runs the
scenarios of :mod:`suite.scenarios` with kura, virtnbdbackup/virtnbdrestore,
borg and restic, and the physical limits (reading the allocated data over
the same NBD export; the machine's hash/compress/encrypt speed). Absolute
times on a shared 2-core machine are noise; the figures that matter are the
ratios between runs measured side by side in the same run.

Modules: ``measure`` (one measured child process: time, peak RSS, cold
cache), ``data`` (the cached disk images), ``labenv`` (the bench lab, its
VMs and the NBD read limit), ``tools`` (kura's and the peers' command lines),
``cpu`` (raw primitive speeds), ``scenarios`` (what is run), ``model`` (the
figures), ``report`` (tables and target checks), ``plots`` (PNGs), ``docs``
(``docs/benchmarks.md``).
"""
