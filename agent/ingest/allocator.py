"""Process-wide tuning of the C allocator for a listener that moves half-megabyte buffers.

A 512x512 CT instance is about 530 KB. Receiving, checking and writing one makes a dozen
buffers of that size (PDU bytes, P-DATA fragments, the assembled dataset, the Part-10 file).
glibc serves every allocation above its mmap threshold (128 KiB at start; it adapts only up to
the size of the largest block freed so far) with a fresh ``mmap`` and gives the pages back at
``free``, so each buffer can pay a page fault per 4 KiB page on first touch: measured here,
joining the two parts of one instance (a 527 KB copy) took 0.49 ms with glibc's defaults and
0.03 ms with the thresholds below. On the whole listener the gain is smaller and within the
run-to-run spread of ``bench/ingest.py`` (a few per cent).

:func:`tune_for_large_buffers` raises the mmap threshold and the trim threshold so that such
buffers are reused from the heap. The process then keeps up to :data:`TRIM_THRESHOLD_BYTES`
of freed memory per arena instead of returning it at once (bounded: it does not grow with
the series). Called by the long-running commands only (``serve``, ``ingest``, ``worker``),
never on import. An operator's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
environment variables win; on a C library other than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from typing import Final

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD: Final = -1
"""glibc ``mallopt`` parameter: free memory at the top of the heap kept before trimming."""
M_MMAP_THRESHOLD: Final = -3
"""glibc ``mallopt`` parameter: allocations at least this large are served by ``mmap``."""

MMAP_THRESHOLD_BYTES: Final = 16 * 1024 * 1024
"""Larger than any single-frame CT instance; glibc accepts at most 32 MiB on 64-bit."""
TRIM_THRESHOLD_BYTES: Final = 64 * 1024 * 1024
"""Freed memory kept per heap for reuse before it is returned to the system."""

OPERATOR_VARIABLES: Final = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_for_large_buffers() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); whether it did."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logger.debug("allocator left as it is: not glibc")
        return False
    if any(name in os.environ for name in OPERATOR_VARIABLES):
        logger.info("allocator left as it is: %s set by the operator",
                    ", ".join(n for n in OPERATOR_VARIABLES if n in os.environ))
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    if not done:
        logger.warning("glibc refused the allocator thresholds; large buffers stay on mmap")
    return done
