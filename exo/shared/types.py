"""The base every type that crosses a boundary (API, wire, dashboard) is built on, and typed ids."""

from __future__ import annotations

import uuid
from typing import Literal, NewType

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)


def new_instance_id() -> InstanceId:
    return InstanceId(uuid.uuid4().hex[:12])


# How a node holds model weights in memory: dequantized to a float type, or kept quantized.
Dtype = Literal["float32", "float16", "bfloat16", "quantized"]
