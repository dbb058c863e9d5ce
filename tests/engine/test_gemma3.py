"""Gemma 3: layer ranges compose to the whole, and sliding-window layers see only their window."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import pytest
from shards import carve, run_in_sequence

from exo.engine.gemma3 import Gemma3Shard, ModelArgs

# Two layers in three slide (a window of 4 positions), with head sizes unlike the hidden size's share.
TINY = ModelArgs(hidden_size=64, num_hidden_layers=6, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=256, sliding_window=4, sliding_window_pattern=3,
                 query_pre_attn_scalar=24.0, rope_theta=1000.0, rope_local_base_freq=100.0)


def tiny(args: ModelArgs = TINY) -> Gemma3Shard:
    mx.random.seed(1)
    model = Gemma3Shard(args)
    mx.eval(model.parameters())
    return model


def logits_one_at_a_time(model: Gemma3Shard, prompt: list[int]) -> mx.array:
    cache = model.make_cache()
    return mx.concatenate([model(mx.array([[token]]), cache) for token in prompt], axis=1)


@pytest.mark.parametrize("ranges", [[(0, 3), (3, 6)], [(0, 1), (1, 5), (5, 6)]])
def test_ranges_run_in_sequence_give_the_logits_of_the_whole(ranges: list[tuple[int, int]]) -> None:
    whole = tiny()
    prompt = list(range(3, 12))
    expected = run_in_sequence([whole], prompt, steps=6)
    got = run_in_sequence([carve(whole, start, end) for start, end in ranges], prompt, steps=6)
    for a, b in zip(expected, got, strict=True):
        assert mx.array_equal(a, b).item()


def test_a_prompt_prefilled_at_once_matches_one_token_at_a_time_past_the_window() -> None:
    model = tiny()
    prompt = [7, 1, 200, 33, 4, 4, 90, 18, 61, 2, 145]  # longer than the window of 4
    at_once = model(mx.array([prompt]), model.make_cache())
    assert mx.allclose(at_once, logits_one_at_a_time(model, prompt), atol=1e-4, rtol=1e-4).item()


def test_sliding_layers_forget_what_left_their_window() -> None:
    model = tiny()
    prompt = [7, 1, 200, 33, 4, 4, 90, 18, 61, 2, 145]
    wide = tiny(replace(TINY, sliding_window=64))  # the same weights, every layer seeing everything
    narrow_logits, wide_logits = logits_one_at_a_time(model, prompt), logits_one_at_a_time(wide, prompt)
    # within the window both agree; beyond it the narrow model has forgotten the start
    assert mx.allclose(narrow_logits[:, :4], wide_logits[:, :4], atol=1e-5).item()
    assert not mx.allclose(narrow_logits[:, 4:], wide_logits[:, 4:], atol=1e-3).item()


def test_only_every_pattern_th_layer_is_global() -> None:
    assert [TINY.is_sliding(i) for i in range(6)] == [True, True, False, True, True, False]
    real = ModelArgs(hidden_size=640, num_hidden_layers=18, intermediate_size=2048, num_attention_heads=4)
    assert [i for i in range(18) if not real.is_sliding(i)] == [5, 11, 17]


def test_a_hugging_face_config_and_its_norms() -> None:
    config = {"model_type": "gemma3", "text_config": {"hidden_size": 1152, "num_hidden_layers": 26,
              "intermediate_size": 6912, "num_attention_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 512}}
    args = ModelArgs.from_dict(config)
    assert (args.hidden_size, args.num_hidden_layers, args.rope_scaling_factor) == (1152, 26, 8.0)
    sanitized = Gemma3Shard.sanitize({"norm.weight": mx.zeros((2,)), "layers.0.mlp.down_proj.weight": mx.zeros((2,))})
    assert sanitized["norm.weight"].tolist() == [1.0, 1.0]  # checkpoints store w for a norm that scales by 1 + w
    assert sanitized["layers.0.mlp.down_proj.weight"].tolist() == [0.0, 0.0]
