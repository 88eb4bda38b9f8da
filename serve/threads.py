"""OS-level names for the server's threads, so `top -H`, py-spy and /proc show which one is which.

Python 3.11 names a `threading.Thread` for Python only: in /proc/<pid>/task/<tid>/comm every thread is called after
the executable. The threads that carry the frame path name themselves with `name_os_thread` as they start; threads
that FFmpeg starts from a named thread (a codec's slice or frame threads) inherit its name, so they group with it.
`benchmarks/serve_passthrough.py --threads` groups the server's CPU time by these names.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_NAME = 15  # prctl(2): the calling thread's name, at most 15 bytes
MAX_NAME_BYTES = 15

PIPELINE_WORKER = "wanrt-pipeline"  # the pipeline worker: input conversion, the model, output conversion
ENCODER = "wanrt-encode"  # the packet path's encoder threads (serve/webrtc/tracks.py)
DECODER = "wanrt-decode"  # aiortc's input decoder thread, named by our decoder when aiortc opens it

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def name_os_thread(name: str) -> bool:
    """Name the calling thread for the OS (Linux; elsewhere nothing happens and False is returned)."""
    if _libc is None:
        return False
    encoded = name.encode()[:MAX_NAME_BYTES]
    return _libc.prctl(PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0) == 0
