"""The default, quantized engine computes what its weights say: the same greedy tokens as those weights
dequantized to float32, and the same tokens whichever exo.kernels code path runs it.

Greedy decoding can part at a near-tie, where the two highest logits are closer than the two
computations' rounding differs (quantized_matmul sums in another order than a float matmul over the
dequantized weights). On SmolLM2-135M Q4_1 and these prompts (measured over 64 tokens) there is none:
the closest top-two margins in the float reference are about 0.003 and 0.005 and both paths still
agree. The tests accept a disagreement only where the reference's margin is under TIE, and say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import mlx.core as mx
import pytest

from exo import kernels
from exo.engine.generate import generate_step
from exo.engine.layers import QuantizedEmbedding, QuantizedLinear
from exo.engine.loading import LoadedModel, load

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain how a bicycle works."]
N_TOKENS = 48
TIE = 1e-2  # logits closer than this are a near-tie: rounding may order them either way
TOKENS_SCRIPT = Path(__file__).parents[1] / "kernel_tokens.py"


@pytest.fixture(scope="module")
def dequantized(model_path: Path) -> LoadedModel:
    return load(model_path, dtype="float32")


def chat(smollm: LoadedModel, text: str) -> list[int]:
    return smollm.tokenizer.encode(smollm.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_the_default_load_keeps_the_weights_quantized_as_stored(smollm: LoadedModel) -> None:
    attention = smollm.model.layers[0].self_attn
    assert isinstance(attention.qkv_proj, QuantizedLinear) and isinstance(smollm.model.embed_tokens, QuantizedEmbedding)
    assert (attention.qkv_proj.bits, attention.qkv_proj.group_size) == (4, 32)  # Q4_1: 4 bits, groups of 32
    assert smollm.model.norm.weight.dtype == mx.float32


@pytest.mark.parametrize("text", PROMPTS)
def test_quantized_greedy_tokens_are_those_of_the_weights_dequantized_to_float32(
        smollm: LoadedModel, dequantized: LoadedModel, text: str) -> None:
    prompt = chat(smollm, text)
    steps = generate_step(prompt, smollm.model, smollm.model.make_cache())
    tokens = list(islice(steps, N_TOKENS))
    steps.close()
    # the float reference reads the same tokens in one pass: its choice at every step, not only the first
    logits = dequantized.model(mx.array([prompt + tokens[:-1]]), dequantized.model.make_cache())[0, len(prompt) - 1:]
    best = mx.argmax(logits, axis=-1).tolist()
    short_by = (mx.max(logits, axis=-1) - logits[mx.arange(N_TOKENS), mx.array(tokens)]).tolist()
    parted = [(i, short_by[i]) for i in range(N_TOKENS) if best[i] != tokens[i]]
    assert all(margin < TIE for _, margin in parted), f"not a near-tie: (step, logit margin) {parted}"
    assert len(parted) <= 1, f"more than one near-tie in {N_TOKENS} tokens: {parted}"


def run_tokens(model_path: Path, env: dict[str, str]) -> dict:  # type: ignore[type-arg]
    done = subprocess.run([sys.executable, str(TOKENS_SCRIPT), str(model_path), "32", PROMPTS[1]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stock_kernels_and_the_chosen_kernels_give_the_same_greedy_tokens(model_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if k != "EXO_KERNELS"}
    stock = run_tokens(model_path, {**base, "EXO_KERNELS": "stock"})
    chosen = run_tokens(model_path, base)
    assert stock["path"] == "stock" and chosen["path"] == kernels.info().path
    for a, b in zip(stock["runs"], chosen["runs"], strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=True)) if x != y), None)
        if same is not None:  # past a near-tie the continuations differ, and neither is wrong
            assert min(a["margins"][same], b["margins"][same]) < TIE, (same, a["margins"][same], b["margins"][same])
        else:
            assert a["tokens"] == b["tokens"]
