"""What a GGUF file's layer range converts to, kept on disk beside it so that the next load skips the
conversion.

A node converts only its layer range, and converting (K-quant super-blocks regrouped, other types
requantized, fused projections widened) costs seconds per hundred megabytes in numpy. The converted
weights are written as safetensors to `.exo-converted/` in the file's directory. (Not the tokenizer:
reading a large one back from JSON holds the interpreter lock for longer than building it, which
stalls the node's event loop past its peers' patience.) Each entry names the file's size and
modification time, so a replaced file is converted afresh, and only the three ranges of each file
used last are kept (a node holds one range of a model at a time; nodes sharing a models directory
on one machine hold one each), which bounds the disk used to about three ranges' size. Entries are
written whole and then renamed into place; one that cannot be read is rebuilt. Where the directory
is not writable, models load as before, converted each time, and the log says so once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

log = logging.getLogger(__name__)

VERSION = 1  # bumped whenever what a conversion produces changes
DIRECTORY = ".exo-converted"
RANGES_KEPT = 3
_unwritable: set[Path] = set()  # directories already reported


class ConvertedCache:
    """The converted forms of one GGUF file."""

    def __init__(self, source: Path) -> None:
        stat = source.stat()
        self.source = source
        self.directory = source.parent / DIRECTORY
        self._key = f"{source.name}.{stat.st_size}-{stat.st_mtime_ns}.v{VERSION}"

    def weights(self, start: int, end: int, convert: Callable[[], dict[str, mx.array]]) -> dict[str, mx.array]:
        """Layers `[start, end)`'s weights as converted before, or `convert()`'s, kept for next time."""
        path = self.directory / f"{self._key}.layers-{start}-{end}.safetensors"
        if path.is_file():
            try:
                weights = mx.load(str(path))
                mx.eval(weights)  # read now: a damaged entry fails here, not in the model
                with contextlib.suppress(OSError):
                    os.utime(path)  # used last
                return weights
            except (RuntimeError, ValueError) as e:
                log.warning("rebuilding %s: %s", path, e)
        weights = convert()
        self._keep(path, weights)
        return weights

    def _keep(self, path: Path, weights: dict[str, mx.array]) -> None:
        """`weights` written to a temporary file renamed to `path`; then of this file's entries only the
        RANGES_KEPT used last remain (entries of a replaced file go at once)."""
        tmp = path.with_name(f".{os.getpid()}.{path.name}")  # MLX would add .safetensors to another suffix
        try:
            self.directory.mkdir(exist_ok=True)
            mx.save_safetensors(str(tmp), weights)
            tmp.replace(path)
        except (OSError, RuntimeError) as e:  # MLX's writer raises RuntimeError
            with contextlib.suppress(OSError):
                tmp.unlink()
            if self.directory not in _unwritable:
                _unwritable.add(self.directory)
                log.warning("not keeping converted models in %s (%s): each load converts again", self.directory,
                            getattr(e, "strerror", None) or e)
            return
        entry = re.compile(rf"{re.escape(self.source.name)}\.\d+-\d+\.v\d+\.")
        with contextlib.suppress(OSError):  # another process may be tidying up too
            entries = [p for p in self.directory.iterdir() if entry.match(p.name)]
            current = sorted((p for p in entries if p.name.startswith(f"{self._key}.")), key=_used, reverse=True)
            for other in [p for p in entries if p not in current] + current[RANGES_KEPT:]:
                other.unlink(missing_ok=True)


def _used(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
