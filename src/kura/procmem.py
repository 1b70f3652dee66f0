"""Process-wide memory behaviour of kura's long-running daemons (agent, server).

Both move data in chunk-sized (4 MiB) buffers on many threads: NBD reads,
sealed blobs, request bodies. glibc serves an allocation that large with its
own ``mmap`` only until the first such block is freed; from then on it raises
its threshold and takes them from per-thread heaps (arenas), whose freed
memory stays in the process. With several backups at once the agent's
resident set grew by ~50 MiB that way (bench scenario 5: 338-346 MiB peak,
295 MiB with a fixed threshold). :func:`return_large_buffers` fixes the
threshold, so every large buffer goes back to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE = 1 << 20


def return_large_buffers(threshold: int = LARGE) -> bool:
    """Serve allocations of ``threshold`` bytes and more by ``mmap`` (glibc only).

    Returns False where the C library has no ``mallopt`` (nothing changes).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; large buffers use the default policy")
    return ok
