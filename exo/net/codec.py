"""One codec for everything nodes say to each other: tagged, versioned msgpack of frozen models.

A frame is `{"v": WIRE_VERSION, "t": <type tag>, "d": <the model as plain data>}`. Nothing is
pickled; a frame that is not valid msgpack, has another version, an unknown tag or a body that
does not validate is rejected with `WireError`, never half-decoded.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError

from exo.shared.types import FrozenModel

WIRE_VERSION = 1
M = TypeVar("M", bound=FrozenModel)


class WireError(ValueError):
    """A frame that cannot be decoded into a known message."""


class Codec:
    def __init__(self, *types: type[FrozenModel]) -> None:
        self.types = {t.__name__: t for t in types}

    def encode(self, message: FrozenModel) -> bytes:
        tag = type(message).__name__
        if tag not in self.types:
            raise TypeError(f"{tag} is not a registered wire message")
        return msgpack.packb({"v": WIRE_VERSION, "t": tag, "d": self.dump(message)})

    @staticmethod
    def dump(message: FrozenModel) -> Any:
        """A message as plain data, as it travels: field names, not /state's camelCase aliases."""
        return message.model_dump(mode="json", by_alias=False)

    def decode(self, frame: bytes) -> FrozenModel:
        try:
            raw: Any = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as e:
            raise WireError(f"not a msgpack frame: {e}") from e
        if not isinstance(raw, dict) or set(raw) != {"v", "t", "d"}:
            raise WireError("a frame is a map of exactly v, t and d")
        if raw["v"] != WIRE_VERSION:
            raise WireError(f"wire version {raw['v']!r} is not {WIRE_VERSION}")
        message_type = self.types.get(raw["t"]) if isinstance(raw["t"], str) else None
        if message_type is None:
            raise WireError(f"unknown message type {raw['t']!r}")
        try:
            return message_type.model_validate(raw["d"])
        except ValidationError as e:
            raise WireError(f"invalid {raw['t']}: {e.error_count()} errors, first: {e.errors()[0]['msg']}") from e
