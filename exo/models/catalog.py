"""The models a node can serve: the registry's cards, its own model files and directories, and the ones
other nodes serve from theirs (fetched from them by layer range, exo/models/peers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from exo.models.cards import CARDS
from exo.models.peers import PeerFetcher, Progress, describe, version_of
from exo.models.store import ModelStore
from exo.shared.errors import ExoError, ModelNotFound
from exo.shared.state import SharedModel


class ModelInfo(BaseModel):
    """A model this node can serve, as GET /v1/models lists it (OpenAI's model object, and more): in
    OpenAI's snake_case, not the camelCase of exo's own state."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "exo"
    name: str
    context_length: int | None
    license: str | None  # the terms a registry model comes under; a local file's are its owner's to know
    downloaded: bool
    local_path: str | None = Field(default=None, exclude=True)  # where this node's own file is: not for clients


class ModelCatalog:
    def __init__(self, store: ModelStore, local: list[Path] | None = None) -> None:
        self.store = store
        self.local: dict[str, Path] = {}
        self._shared: dict[str, SharedModel] = {}
        # Set by the node: the models peers serve from their files, and how to fetch from them.
        self.advertised: Callable[[], dict[str, SharedModel]] = dict
        self.peers: PeerFetcher | None = None
        for path in local or []:
            self.add_local(path)

    def add_local(self, path: Path) -> str:
        """Serve the model at `path` (a .gguf file or a model directory) under its file name."""
        path = path.expanduser().resolve()
        model_id = path.stem if path.is_file() else path.name
        self.local[model_id] = path
        self._shared.pop(model_id, None)
        return model_id

    def register(self, spec: str) -> str:
        """The model id for `spec`: a registry id as it is, or a local path, added to the catalog."""
        if spec in CARDS or spec in self.local:
            return spec
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelNotFound(f"{spec!r} is neither a model id (see `exo models`) nor an existing path.")
        return self.add_local(path)

    def shared(self) -> tuple[SharedModel, ...]:
        """This node's own models as its profile advertises them (their shape read once, their version
        whenever asked: a file replaced meanwhile is a new version). Files that cannot be read as models
        are not advertised; a chat for one says why."""
        out = []
        for model_id, path in self.local.items():
            try:
                if (known := self._shared.get(model_id)) is None or version_of(path) != known.version:
                    known = self._shared[model_id] = describe(model_id, path)
                out.append(known)
            except (ExoError, OSError):
                continue
        return tuple(out)

    def path(self, model_id: str, *, layers: tuple[int, int] | None = None,
             progress: Progress | None = None) -> Path:
        """The local path of `model_id`'s files, fetched first if needed: a registry model whole into the
        cache, a peer's model as far as `layers` read (None: its tokenizer and shape)."""
        if model_id in self.local:
            return self.local[model_id]
        if model_id in CARDS:
            return self.store.ensure(CARDS[model_id])
        self.check(model_id)
        if self.peers is None:
            raise ModelNotFound(f"{model_id!r} is served by another node, and this one fetches from none.")
        return self.peers.ensure(model_id, layers, progress)

    def check(self, model_id: str) -> None:
        """Raise ModelNotFound unless this node can serve `model_id`."""
        if model_id not in self.local and model_id not in CARDS and model_id not in self.advertised():
            raise ModelNotFound(f"The model {model_id!r} does not exist. GET /v1/models lists the models this node "
                                "can serve; start the node with --model PATH to serve a local one.", param="model")

    def list(self) -> list[ModelInfo]:
        infos = [ModelInfo(id=c.id, name=c.name, context_length=c.context_length, license=c.license,
                           downloaded=self.store.is_present(c)) for c in CARDS.values()]
        infos += [ModelInfo(id=i, name=i, context_length=None, license=None, local_path=str(p), downloaded=True)
                  for i, p in self.local.items()]
        infos += [ModelInfo(id=i, name=i, context_length=None, license=None, downloaded=False)
                  for i in sorted(self.advertised()) if i not in self.local and i not in CARDS]
        return infos
