"""`python tests/session_guard.py CMD...`: run CMD as this process's child and exit with its status, killing
this whole session (CMD's Ray cluster with it) if the process that started the guard ends first.

tests/recipes.py starts each recipe through it, in a session of its own. A pytest process that is killed
(SIGTERM, SIGKILL: not ^C) runs none of its unconfigure hooks, and a recipe started in the background
(conftest.py) would run on, with its Ray cluster, beside whatever comes next on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def main(cmd: list[str]) -> int:
    parent = os.getppid()
    child = subprocess.Popen(cmd)
    while (rc := child.poll()) is None:
        if os.getppid() != parent:  # re-parented: whoever started the guard is gone
            os.killpg(os.getpgid(0), signal.SIGKILL)
        time.sleep(POLL_S)
    return 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell says


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
