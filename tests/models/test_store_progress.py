"""Progress bars (tqdm's and pip's) only when stderr is a terminal: under systemd they would land in the
journal as "[1.2K blob data]", where one log line per milestone says the same."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

PROBE = "import sys; from pathlib import Path; from exo.models.store import ModelStore; " \
        "print(ModelStore(Path('unused')).progress, file=sys.stdout)"


def progress_shown(stderr_is_a_terminal: bool) -> str:
    if not stderr_is_a_terminal:
        return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    leader, follower = pty.openpty()
    try:
        return subprocess.run([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=follower, text=True,
                              check=True).stdout
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.parametrize(("terminal", "shown"), [(False, "False"), (True, "True")], ids=["journal", "terminal"])
def test_progress_bars_only_when_stderr_is_a_terminal(terminal: bool, shown: str) -> None:
    assert progress_shown(terminal).strip() == shown
