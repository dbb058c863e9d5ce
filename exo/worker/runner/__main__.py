"""`python -m exo.worker.runner SPEC_JSON`: a runner process, started by its node's supervisor.

Its stdout carries frames to the node, so anything else written to fd 1 goes to stderr. It dies
with its node: on Linux the kernel sends SIGKILL when the parent exits, and everywhere the end of
stdin (the node's end of the pipe closed) stops it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

from exo.worker.runner.messages import RunnerSpec

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the node died before the line above took effect
        os._exit(1)


def main() -> None:
    spec = RunnerSpec.model_validate_json(sys.argv[1])
    _die_with_parent(int(sys.argv[2]))
    frames = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from exo.worker.runner.runner import Runner  # after the pipe is set up: importing MLX takes a while

    joined = Runner(spec, frames).run(sys.stdin.buffer)
    frames.flush()
    if not joined:
        os._exit(0)


if __name__ == "__main__":
    main()
