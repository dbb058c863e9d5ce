"""The base every type that crosses a boundary (API, wire, dashboard) is built on, and typed ids."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal, NewType

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class FrozenModel(BaseModel):
    # camelCase out, as exo's upstream serializes its state; either spelling in
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True,
                              serialize_by_alias=True)


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
