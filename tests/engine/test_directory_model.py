"""Loading an MLX / Hugging Face style model directory, written by the tests: a 2-layer random Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from shards import run_in_sequence

from exo.engine.generate import GenerationParams, generate_text
from exo.engine.layers import QuantizedEmbedding, QuantizedLinear
from exo.engine.loading import LoadedModel, load
from exo.engine.tokenizer import Tokenizer
from exo.shared.errors import ModelFormatError

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
# No default system prompt, unlike the GGUF's template, so a rendered prompt shows which one was used.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROJECTIONS = {
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def hf_weights(vocab_size: int, *, tie: bool = True, seed: int = 0) -> dict[str, mx.array]:
    """Random weights under Hugging Face's Llama names."""
    keys = iter(mx.random.split(mx.random.key(seed), 64))

    def normal(*shape: int, scale: float = 0.1) -> mx.array:
        return mx.random.normal(shape, key=next(keys)) * scale

    weights = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN, scale=0.5),
               "model.norm.weight": 1 + normal(HIDDEN)}
    for i in range(LAYERS):
        weights[f"model.layers.{i}.input_layernorm.weight"] = 1 + normal(HIDDEN)
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = 1 + normal(HIDDEN)
        for name, shape in PROJECTIONS.items():
            weights[f"model.layers.{i}.{name}.weight"] = normal(*shape)
    if not tie:
        weights["lm_head.weight"] = normal(vocab_size, HIDDEN)
    return weights


def quantized(weights: dict[str, mx.array], group_size: int = 64, bits: int = 4) -> dict[str, mx.array]:
    """The matrices packed as MLX stores them (`.weight`, `.scales`, `.biases`); norms stay float."""
    out = {}
    for name, value in weights.items():
        if value.ndim == 2:
            prefix = name.removesuffix(".weight")
            out[name], out[f"{prefix}.scales"], out[f"{prefix}.biases"] = mx.quantize(value, group_size, bits)
        else:
            out[name] = value
    return out


def write_model(path: Path, tokenizer: Tokenizer, weights: dict[str, mx.array], **config: Any) -> Path:
    """A model directory as the Hub or mlx-lm lays it out: config, safetensors shards, tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "vocab_size": tokenizer.backend.get_vocab_size(), "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": "lm_head.weight" not in weights, "max_position_embeddings": 2048,
        "bos_token_id": 1, "eos_token_id": 2, **config,
    }
    (path / "config.json").write_text(json.dumps(config))
    # two shards, as large checkpoints come: the embedding in one, the rest in the other
    embedding = {k: v for k, v in weights.items() if k.startswith("model.embed_tokens.")}
    mx.save_safetensors(str(path / "model-00001-of-00002.safetensors"), embedding)
    mx.save_safetensors(str(path / "model-00002-of-00002.safetensors"),
                        {k: v for k, v in weights.items() if k not in embedding})
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return path


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm: LoadedModel) -> Tokenizer:
    return smollm.tokenizer


@pytest.fixture(scope="module")
def weights(gguf_tokenizer: Tokenizer) -> dict[str, mx.array]:
    return hf_weights(gguf_tokenizer.backend.get_vocab_size())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, gguf_tokenizer: Tokenizer,
              weights: dict[str, mx.array]) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-llama"), gguf_tokenizer, weights)


@pytest.fixture(scope="module")
def tiny(model_dir: Path) -> LoadedModel:
    return load(model_dir)


@pytest.fixture(scope="module")
def prompt(tiny: LoadedModel) -> list[int]:
    return tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(MESSAGES))


def test_directory_model_loads_with_the_args_of_its_config(tiny: LoadedModel) -> None:
    args = tiny.args
    assert (args.num_hidden_layers, args.hidden_size, args.intermediate_size) == (LAYERS, HIDDEN, INTERMEDIATE)
    assert (args.num_attention_heads, args.n_kv_heads, args.dim_per_head) == (HEADS, KV_HEADS, HEAD_DIM)
    assert args.vocab_size == 49152 and args.tie_word_embeddings
    assert not args.rope_traditional  # Hugging Face checkpoints rotate halves, not interleaved pairs
    assert tiny.model.is_first and tiny.model.is_last


def test_loaded_weights_are_the_files_with_qkv_and_gate_up_fused_in_order(
        tiny: LoadedModel, weights: dict[str, mx.array]) -> None:
    layer, prefix = tiny.model.layers[1], "model.layers.1"
    qkv = mx.concatenate([weights[f"{prefix}.self_attn.{p}_proj.weight"] for p in "qkv"])
    gate_up = mx.concatenate([weights[f"{prefix}.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert mx.array_equal(layer.self_attn.qkv_proj.weight, qkv).item()
    assert mx.array_equal(layer.mlp.gate_up_proj.weight, gate_up).item()
    assert mx.array_equal(layer.input_layernorm.weight, weights[f"{prefix}.input_layernorm.weight"]).item()
    assert mx.array_equal(tiny.model.embed_tokens.weight, weights["model.embed_tokens.weight"]).item()


def test_directory_model_split_into_two_ranges_gives_the_same_logits_as_the_whole(
        model_dir: Path, tiny: LoadedModel, prompt: list[int]) -> None:
    first, second = load(model_dir, 0, 1).model, load(model_dir, 1, 2).model
    assert "embed_tokens" in first and "norm" not in first and "norm" in second
    whole, split = run_in_sequence([tiny.model], prompt), run_in_sequence([first, second], prompt)
    for a, b in zip(whole, split, strict=True):
        assert mx.array_equal(a, b).item()


def test_generation_runs_on_the_directory_model(tiny: LoadedModel, prompt: list[int]) -> None:
    deltas = list(generate_text(prompt, tiny.model, tiny.tokenizer, GenerationParams(max_tokens=4),
                                tiny.model.make_cache()))
    assert deltas[-1].finish_reason in ("stop", "length")
    assert 1 <= deltas[-1].n_tokens <= 4


def test_tokenizer_and_chat_template_come_from_the_directory(tiny: LoadedModel, gguf_tokenizer: Tokenizer) -> None:
    assert tiny.tokenizer.chat_template == TEMPLATE
    rendered = tiny.tokenizer.apply_chat_template(MESSAGES)
    assert rendered == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert tiny.tokenizer.eos_ids == (2,) and tiny.tokenizer.bos_id == 1
    text = "Tokens café 日本 2024 <|im_end|>"
    assert tiny.tokenizer.encode(text) == gguf_tokenizer.encode(text)


def test_chat_template_jinja_file_overrides_the_tokenizer_config(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    gguf_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_directory(tmp_path).apply_chat_template(MESSAGES) == "What is the capital of France?!"


def test_directory_model_with_its_own_output_head(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    weights = hf_weights(gguf_tokenizer.backend.get_vocab_size(), tie=False, seed=1)
    path = write_model(tmp_path / "untied", gguf_tokenizer, weights)
    whole, last = load(path), load(path, 1, 2)
    assert not whole.args.tie_word_embeddings
    assert "embed_tokens" not in last.model  # the last range needs no embedding when the head is its own
    assert mx.array_equal(last.model.lm_head.weight, weights["lm_head.weight"]).item()
    prompt = whole.tokenizer.encode("Hello there")
    split = run_in_sequence([load(path, 0, 1).model, last.model], prompt)
    for a, b in zip(run_in_sequence([whole.model], prompt), split, strict=True):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_directory_model_loads_in_a_half_precision_dtype(model_dir: Path, dtype: str) -> None:
    model = load(model_dir, dtype=dtype).model  # type: ignore[arg-type]
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == getattr(mx, dtype)
    assert model.norm.weight.dtype == getattr(mx, dtype)


def test_quantized_directory_loads_quantized_and_as_float_with_close_logits(
        tmp_path: Path, gguf_tokenizer: Tokenizer, weights: dict[str, mx.array]) -> None:
    path = write_model(tmp_path / "q4", gguf_tokenizer, quantized(weights),
                       quantization={"group_size": 64, "bits": 4})
    packed, dense = load(path, dtype="quantized"), load(path, dtype="float32")
    assert isinstance(packed.model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    assert isinstance(packed.model.embed_tokens, QuantizedEmbedding)
    assert type(dense.model.layers[0].self_attn.qkv_proj) is nn.Linear
    prompt = dense.tokenizer.encode("What is the capital of France?")
    for a, b in zip(run_in_sequence([packed.model], prompt), run_in_sequence([dense.model], prompt), strict=True):
        assert mx.allclose(a, b, rtol=1e-3, atol=1e-3).item(), mx.abs(a - b).max().item()


def test_directory_without_safetensors_raises_model_format_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFormatError, match="safetensors"):
        load(tmp_path)


def test_unsupported_model_type_raises_model_format_error(
        tmp_path: Path, gguf_tokenizer: Tokenizer, weights: dict[str, mx.array]) -> None:
    write_model(tmp_path, gguf_tokenizer, weights, model_type="gpt2")
    with pytest.raises(ModelFormatError, match="gpt2"):
        load(tmp_path)


@pytest.mark.parametrize("name", ["model.bin", "empty-dir"])
def test_path_that_is_neither_gguf_nor_model_directory_raises_model_format_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\0") if name.endswith(".bin") else path.mkdir()
    with pytest.raises(ModelFormatError):
        load(path)
