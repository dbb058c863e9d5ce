"""One node's own model, served by many: the nodes that lack its files fetch, from a node that has them,
only the bytes their layer range reads.

A node started with `--model PATH` advertises that model in its profile (`SharedModel`: its version,
size and shape), and answers two requests from peers, each signed with the cluster secret as frames are
(exo/net/auth.py), over a request line that names what it asks for:

    GET /cluster/models/{id}/manifest?start=S&end=E   the files and the pieces of them that loading layers
                                                      [S, E) reads, each piece's sha256 (without S and E:
                                                      what the tokenizer and shape need, the header)
    GET /cluster/models/{id}/piece?file=F&offset=O&length=L   those bytes

A node placed on that model keeps a copy in `<models dir>/.peers/<id>/<version>/`: each file as large
as the original and sparse, holding the pieces (blocks of 4 MiB) fetched so far, with a list of them
beside it, appended only after a piece whose sha256 matched is written and flushed. So a fetch cut short
(a restart, a lost peer) resumes with the pieces missing; a piece that arrives damaged is asked for
again, then the fetch goes on from another holder; and a later placement on other layers fetches only
what it adds. The loader reads the copy as it reads the original: only the ranges it needs, which are
there. A new version (the holder changed its files) is a new copy; the old one is removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
from filelock import FileLock

from exo.engine.loading import Extent, extents, footprint
from exo.net.auth import HEADER, ClusterAuth
from exo.net.transport import error_message
from exo.shared.errors import InvalidRequest, ModelFetchError, ModelNotFound
from exo.shared.state import SharedModel
from exo.shared.types import FrozenModel

log = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20  # the most one piece request carries: a lost piece costs little to fetch again
DIRECTORY = ".peers"  # under the models directory
ATTEMPTS = 3  # per piece and holder, before the fetch moves to the next holder
_MANIFESTS_KEPT = 16


class Piece(FrozenModel):
    offset: int
    length: int
    sha256: str


class ManifestFile(FrozenModel):
    name: str
    size: int
    pieces: tuple[Piece, ...]


class Manifest(FrozenModel):
    """What a layer range of a model reads, as its holder has it now."""

    model_id: str
    version: str
    files: tuple[ManifestFile, ...]

    @property
    def is_file(self) -> bool:
        """A GGUF model (one file) rather than a directory."""
        return len(self.files) == 1 and self.files[0].name.endswith(".gguf")


def version_of(path: Path) -> str:
    """Changes whenever the model's files do: a digest of their names, sizes and modification times."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def describe(model_id: str, path: Path) -> SharedModel:
    """What a node advertises about a model it serves from `path`."""
    model = footprint(path)
    return SharedModel(model_id=model_id, version=version_of(path), bytes=model.stored, n_params=model.params,
                       n_layers=model.n_layers, kv_width=model.kv_width, context_length=model.context_length)


def _request_line(path: str, params: dict[str, object]) -> str:
    """The path and query a piece or manifest request is sent with and signed over."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return f"{path}?{query}" if query else path


def signed_frame(method: str, request_line: str) -> bytes:
    """What a model request's proof signs: its method and request line."""
    return f"{method} {request_line}".encode()


# -- the holder's side -----------------------------------------------------------------------------------


class ModelServer:
    """Answers peers' manifest and piece requests for the models this node serves from its own files."""

    def __init__(self, local: Callable[[], dict[str, Path]], *, piece_bytes: int = PIECE_BYTES) -> None:
        self._local, self.piece_bytes = local, piece_bytes
        self._manifests: OrderedDict[tuple[str, str, tuple[int, int] | None], Manifest] = OrderedDict()

    def _path(self, model_id: str) -> Path:
        if (path := self._local().get(model_id)) is None:
            raise ModelNotFound(f"This node does not serve {model_id!r} from its own files.", param="model_id")
        return path

    def manifest(self, model_id: str, layers: tuple[int, int] | None) -> Manifest:
        """The pieces of `model_id`'s files that loading `layers` reads, hashed (kept for the next asker)."""
        path = self._path(model_id)
        version = version_of(path)
        key = (model_id, version, layers)
        if (found := self._manifests.get(key)) is not None:
            self._manifests.move_to_end(key)
            return found
        if layers is not None:
            n_layers = footprint(path).n_layers
            if not 0 <= layers[0] < layers[1] <= n_layers:
                raise InvalidRequest(f"Layers [{layers[0]}, {layers[1]}) are not inside {model_id}'s [0, {n_layers}).",
                                     param="start")
        files = tuple(ManifestFile(name=e.name, size=e.size, pieces=tuple(_pieces(path, e, self.piece_bytes)))
                      for e in extents(path, layers))
        found = self._manifests[key] = Manifest(model_id=model_id, version=version, files=files)
        while len(self._manifests) > _MANIFESTS_KEPT:
            self._manifests.popitem(last=False)
        return found

    def piece(self, model_id: str, name: str, offset: int, length: int) -> bytes:
        path = self._path(model_id)
        if name not in {f.name for f in self.manifest(model_id, None).files}:  # kept: no parse per piece
            raise ModelNotFound(f"{model_id} has no file {name!r}.", param="file")
        file = path if path.is_file() else path / name
        size = file.stat().st_size
        if not (0 <= offset and 0 < length <= PIECE_BYTES and offset + length <= size):
            raise InvalidRequest(f"Bytes [{offset}, {offset + length}) are not a piece of {name} ({size} bytes; "
                                 f"at most {PIECE_BYTES} per piece).", param="offset")
        with file.open("rb") as f:
            f.seek(offset)
            return f.read(length)


def _pieces(root: Path, extent: Extent, size: int) -> Iterable[Piece]:
    """The blocks of `size` bytes (on one grid per file, so that every range's pieces of a file are alike)
    that `extent`'s spans touch, each with its sha256."""
    blocks = sorted({i for offset, length in extent.spans
                     for i in range(offset // size, (offset + length - 1) // size + 1)})
    with (root if root.is_file() else root / extent.name).open("rb") as f:
        for i in blocks:
            f.seek(i * size)
            data = f.read(size)
            yield Piece(offset=i * size, length=len(data), sha256=hashlib.sha256(data).hexdigest())


# -- the fetching side -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A node that serves the model from its own files, and where its API is."""

    node_id: str
    url: str
    model: SharedModel


Progress = Callable[[int, int, str], None]  # (bytes held, bytes the range needs, the holder's node id)


class PeerFetcher:
    """Fetches the pieces of a peer's model that a layer range reads into a local copy, and says where it is."""

    def __init__(self, models_dir: Path, holders: Callable[[str], list[Holder]], auth: ClusterAuth | None, *,
                 timeout: float = 30.0) -> None:
        self.root = models_dir / DIRECTORY
        self.holders, self.auth, self.timeout = holders, auth, timeout

    def ensure(self, model_id: str, layers: tuple[int, int] | None, progress: Progress | None = None) -> Path:
        """The local copy of `model_id` holding what `layers` reads (None: the tokenizer and shape)."""
        holders = self.holders(model_id)
        if not holders:
            raise ModelNotFound(f"No node of the cluster serves {model_id!r} from its files now.", param="model")
        errors = []
        for holder in holders:
            try:
                return self._fetch(holder, layers, progress)
            except (httpx.HTTPError, ModelFetchError, OSError) as e:
                errors.append(f"from {holder.node_id}: {e}")
                log.warning("model=%s fetching layers %s from %s failed: %s", model_id, layers, holder.node_id, e)
        raise ModelFetchError(f"{model_id} could not be fetched from the nodes that have it ({'; '.join(errors)})")

    def _fetch(self, holder: Holder, layers: tuple[int, int] | None, progress: Progress | None) -> Path:
        model_id = holder.model.model_id
        home = self.root / _quote(model_id)
        home.mkdir(parents=True, exist_ok=True)
        with httpx.Client(base_url=holder.url, timeout=self.timeout) as client:
            start, end = layers if layers is not None else (None, None)
            manifest = Manifest.model_validate_json(self._get(client, holder, f"/cluster/models/{_quote(model_id)}"
                                                              "/manifest", {"start": start, "end": end}))
            copy = home / manifest.version
            needed = sum(p.length for file in manifest.files for p in file.pieces)
            if all(set(file.pieces) <= _recorded(copy, file) for file in manifest.files):
                # all there already (a prompt's header, after a range): no waiting behind a fetch in progress
                if progress is not None:
                    progress(needed, needed, holder.node_id)
                return _model_path(copy, manifest)
            with FileLock(str(home / ".lock")):
                self._fill(client, holder, manifest, home, layers, progress)
            return _model_path(copy, manifest)

    def _fill(self, client: httpx.Client, holder: Holder, manifest: Manifest, home: Path,
              layers: tuple[int, int] | None, progress: Progress | None) -> None:
        """Fetch into the copy the manifest's pieces it lacks (under the model's lock)."""
        model_id, copy = manifest.model_id, home / manifest.version
        for stale in home.iterdir():  # the holder's files changed since: their old copy is no use
            if stale.is_dir() and stale.name != manifest.version:
                log.info("model=%s removing the copy of version %s", model_id, stale.name)
                shutil.rmtree(stale, ignore_errors=True)
        copy.mkdir(exist_ok=True)
        held = {file.name: _held(copy, file) for file in manifest.files}
        needed = sum(p.length for file in manifest.files for p in file.pieces)
        done = sum(p.length for file in manifest.files for p in file.pieces if p in held[file.name])
        if progress is not None:
            progress(done, needed, holder.node_id)
        if done < needed:
            log.info("model=%s fetching %d of %d MB for layers %s from %s", model_id, (needed - done) // 10**6,
                     needed // 10**6, layers, holder.node_id)
        for file in manifest.files:
            for piece in file.pieces:
                if piece in held[file.name]:
                    continue
                data = self._piece(client, holder, file.name, piece)
                _write(copy, file.name, piece, data)
                held[file.name].add(piece)
                done += piece.length
                if progress is not None:
                    progress(done, needed, holder.node_id)

    def _piece(self, client: httpx.Client, holder: Holder, name: str, piece: Piece) -> bytes:
        params = {"file": name, "offset": piece.offset, "length": piece.length}
        for attempt in range(1, ATTEMPTS + 1):
            data = self._get(client, holder, f"/cluster/models/{_quote(holder.model.model_id)}/piece", params)
            if hashlib.sha256(data).hexdigest() == piece.sha256:
                return data
            log.warning("model=%s piece %s@%d from %s failed its checksum (attempt %d of %d)",
                        holder.model.model_id, name, piece.offset, holder.node_id, attempt, ATTEMPTS)
        raise ModelFetchError(f"piece {name}@{piece.offset} failed its checksum {ATTEMPTS} times")

    def _get(self, client: httpx.Client, holder: Holder, path: str, params: dict[str, object]) -> bytes:
        line = _request_line(path, params)
        headers = {HEADER: self.auth.sign(signed_frame("GET", line), holder.node_id)} if self.auth else {}
        response = client.get(line, headers=headers)
        if response.status_code != 200:
            raise ModelFetchError(f"GET {path} answered {response.status_code}: {error_message(response)}")
        return response.content


def _model_path(copy: Path, manifest: Manifest) -> Path:
    return copy / manifest.files[0].name if manifest.is_file else copy


def _held(copy: Path, file: ManifestFile) -> set[Piece]:
    """The pieces of `file` its copy holds; a copy missing or of another size is started afresh (under the
    model's lock)."""
    target = copy / file.name
    if not target.is_file() or target.stat().st_size != file.size:
        (copy / f".{file.name}.pieces").unlink(missing_ok=True)
        with target.open("wb") as f:
            f.truncate(file.size)  # sparse: only the pieces fetched take disk
        return set()
    return _recorded(copy, file)


def _recorded(copy: Path, file: ManifestFile) -> set[Piece]:
    """The pieces of `file` its copy's record lists (none if the copy is missing or of another size); a
    line being written, incomplete, names no piece."""
    target, record = copy / file.name, copy / f".{file.name}.pieces"
    if not target.is_file() or target.stat().st_size != file.size or not record.is_file():
        return set()
    held = set()
    for line in record.read_text().splitlines():
        offset, length, sha256 = (line.split() + ["", "", ""])[:3]
        if offset.isdigit() and length.isdigit() and len(sha256) == 64:
            held.add(Piece(offset=int(offset), length=int(length), sha256=sha256))
    return held


def _write(copy: Path, name: str, piece: Piece, data: bytes) -> None:
    """Write `data` where `piece` goes, flushed to disk, and only then record it as held."""
    fd = os.open(copy / name, os.O_WRONLY)
    try:
        os.pwrite(fd, data, piece.offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    with (copy / f".{name}.pieces").open("a") as record:
        record.write(f"{piece.offset} {piece.length} {piece.sha256}\n")
        record.flush()
        os.fsync(record.fileno())


def _quote(model_id: str) -> str:
    """A model id as one path segment (of a URL, or of a directory name)."""
    return urllib.parse.quote(model_id, safe="")
