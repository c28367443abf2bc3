"""The few C library calls that the build and the runtime make on this process's memory, through ctypes.

Linux only: elsewhere `function` gives None and every call here is a no-op, so callers need no platform test.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_LIBC: dict[str, Any] = {}


def function(name: str) -> Any:
    """The C library's function `name` (ctypes), or None off Linux or where the library lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    if "libc" not in _LIBC:
        try:
            _LIBC["libc"] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _LIBC["libc"] = None
    return getattr(_LIBC["libc"], name, None)


def madvise(start: int, length: int, advice: int | None) -> bool:
    """madvise(2) on [start, start + length) (whole pages); False when it cannot be made or fails."""
    call = function("madvise")
    if call is None or advice is None or length <= 0:
        return False
    return call(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0
