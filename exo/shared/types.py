"""The base every type that crosses a boundary (API, wire, dashboard) is built on, and typed ids."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal, NewType

from annotated_types import Interval
from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class FrozenModel(BaseModel):
    # camelCase out, as exo's upstream serializes its state; either spelling in
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True,
                              serialize_by_alias=True)


# Every integer that comes off the wire is bounded where it is declared, so a peer's 2**64 is refused at
# decode and never reaches arithmetic (a term + 1) or an encoder that cannot carry it. 2**53 keeps
# values exact in JSON (the dashboard) and far below msgpack's limits, with room for `+ 1`.
WIRE_INT_MAX = 2**53
Count = Annotated[int, Interval(ge=0, le=WIRE_INT_MAX)]  # terms, sizes in bytes, restarts, queue lengths
Index = Annotated[int, Interval(ge=-1, le=WIRE_INT_MAX)]  # an event index or a term, -1 where there is none yet
Port = Annotated[int, Interval(ge=1, le=65535)]
RingPort = Annotated[int, Interval(ge=0, le=65535)]  # 0 while a runner has not bound its ring socket
Small = Annotated[int, Interval(ge=0, le=1 << 20)]  # ranks, layers, CPU cores
Context = Annotated[int, Interval(ge=16, le=1 << 24)]  # positions (prompt and completion) an instance serves

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)


def new_instance_id() -> InstanceId:
    return InstanceId(uuid.uuid4().hex[:12])


def _utf8(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"text with an unpaired surrogate ({text[e.start:e.end]!a}), not valid Unicode") from None
    return text


# Text from a client that goes on to the tokenizer or the wire, which take UTF-8. JSON can carry an
# unpaired surrogate (`"\ud800"`) that UTF-8 cannot, so it is refused where it comes in.
Utf8Str = Annotated[str, AfterValidator(_utf8)]


# How a node holds model weights in memory: dequantized to a float type, or kept quantized.
Dtype = Literal["float32", "float16", "bfloat16", "quantized"]
CacheDtype = Literal["float32", "float16"]  # the attention's key/value cache
BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}  # a float dtype's; "quantized" is as stored


def cache_value_bytes(dtype: Dtype, kv_cache: CacheDtype | None) -> int:
    """Bytes of one key or value element in the attention's cache: `kv_cache`'s dtype, else the
    activations' (float32, unless the weights are held as a half type)."""
    return BYTES_PER_PARAM[kv_cache or (dtype if dtype in ("float16", "bfloat16") else "float32")]
