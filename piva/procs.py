"""Child processes that end with whoever started them.

A benchmark driver killed by SIGKILL cannot clean up: without this its workers (and the
threestudio `launch.py` they start) go on training as orphans and collide with a rerun.
Linux kills a child when its parent dies (PR_SET_PDEATHSIG); a watchdog thread covers the
rest (and a parent that died before the child set it). Imports nothing from piva.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def _set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def die_with_parent(expected_parent: int | None = None, poll_s: float = 1.0) -> None:
    """Call first thing in a child: it is killed when its parent dies, whatever kills the parent.

    `expected_parent`: the parent's pid as the parent saw it (the child may start after it died)."""
    parent = expected_parent if expected_parent is not None else os.getppid()
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def preexec_die_with_parent() -> None:
    """`subprocess.Popen(preexec_fn=...)`: the started program dies with the process that started it
    (the kernel's signal only: a watchdog thread does not survive exec)."""
    _set_parent_death_signal()
