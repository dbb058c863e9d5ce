"""The base every type that crosses a boundary (API, wire, dashboard) is built on."""

from typing import Literal

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# How a node holds model weights in memory: dequantized to a float type, or kept quantized.
Dtype = Literal["float32", "float16", "bfloat16", "quantized"]
