"""Samplers: greedy is argmax, a seed makes draws reproducible, top-p never leaves the nucleus."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from exo.engine.sample import make_sampler

DRAWS = 4000  # rows sampled at once; each row is an independent draw


def logits_of(probs: list[float], rows: int = 1) -> mx.array:
    return mx.broadcast_to(mx.log(mx.array(probs)), (rows, len(probs)))


def draws(sampler_seed: int | None, n: int = 24, vocab: int = 1000) -> list[int]:
    sampler = make_sampler(1.0, seed=sampler_seed)
    flat = mx.zeros((1, vocab))
    return [int(sampler(flat).item()) for _ in range(n)]


def test_greedy_picks_the_argmax_of_each_row() -> None:
    logits = mx.array([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 0.0], [-3.0, -2.0, -1.0, -1.5]])
    assert make_sampler()(logits).tolist() == [1, 0, 2]


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_zero_or_below_is_greedy_and_ignores_the_seed(temperature: float) -> None:
    logits = mx.random.normal((8, 500), key=mx.random.key(3))
    expected = mx.argmax(logits, axis=-1).tolist()
    for seed in (None, 1, 2):
        assert make_sampler(temperature, top_p=0.5, seed=seed)(logits).tolist() == expected


def test_same_seed_gives_the_same_draws() -> None:
    assert draws(7) == draws(7)


def test_different_seeds_give_different_draws_on_a_flat_distribution() -> None:
    assert draws(7) != draws(8)


def test_successive_draws_of_one_seeded_sampler_differ() -> None:
    assert len(set(draws(7))) > 1


def test_seeded_batch_draw_is_reproducible() -> None:
    logits = logits_of([0.25] * 4, rows=64)
    assert make_sampler(0.8, seed=5)(logits).tolist() == make_sampler(0.8, seed=5)(logits).tolist()


def test_small_top_p_on_a_peaked_distribution_always_returns_the_top_token() -> None:
    tokens = make_sampler(1.0, top_p=0.1, seed=0)(logits_of([0.1, 0.6, 0.2, 0.1], rows=DRAWS))
    assert set(tokens.tolist()) == {1}


def test_top_p_never_samples_outside_the_nucleus() -> None:
    # sorted: 0.5 (id 3), 0.3 (id 1), 0.15, 0.05; the mass before id 2 is 0.8 >= 0.7, so it is cut
    logits = logits_of([0.05, 0.3, 0.15, 0.5], rows=DRAWS)
    tokens = make_sampler(1.0, top_p=0.7, seed=1)(logits).tolist()
    assert set(tokens) == {1, 3}
    # inside the nucleus the odds are renormalized: 0.5 / 0.8
    share = tokens.count(3) / DRAWS
    assert math.isclose(share, 0.625, abs_tol=0.05)


def test_without_top_p_the_tail_is_sampled() -> None:
    # the control for the nucleus test: the same distribution reaches its tail when nothing is cut
    tokens = make_sampler(1.0, seed=1)(logits_of([0.05, 0.3, 0.15, 0.5], rows=DRAWS)).tolist()
    assert set(tokens) == {0, 1, 2, 3}


def test_top_p_keeps_every_token_that_is_needed_to_reach_it() -> None:
    # a flat distribution needs three of four tokens to reach 0.6 of the mass
    tokens = make_sampler(1.0, top_p=0.6, seed=2)(logits_of([0.25] * 4, rows=DRAWS)).tolist()
    assert len(set(tokens)) == 3


def test_low_temperature_concentrates_on_the_top_token() -> None:
    logits = logits_of([0.2, 0.3, 0.5], rows=DRAWS)
    cold = make_sampler(0.1, seed=3)(logits).tolist()
    hot = make_sampler(1.0, seed=3)(logits).tolist()
    assert cold.count(2) / DRAWS > 0.95 > 0.6 > hot.count(2) / DRAWS


def test_min_p_leaves_out_every_token_less_likely_than_its_share_of_the_top_one() -> None:
    probs = [0.5, 0.3, 0.12, 0.08]  # min_p 0.2: out with less than 0.1, the last token
    tokens = make_sampler(1.0, min_p=0.2, seed=4)(logits_of(probs, rows=DRAWS)).tolist()
    assert set(tokens) == {0, 1, 2}
    assert abs(tokens.count(0) / DRAWS - 0.5 / 0.92) < 0.03  # the rest keep their odds


def test_greedy_penalties_lower_a_token_by_its_presence_and_once_per_time_it_was_given() -> None:
    flat = mx.array([[3.0, 2.5, 1.0]])
    # frequency 0.3: token 0 drops 0.3 a time, so 0 twice (3.0, 2.7), then 1 (2.5 > 2.4), then 0 again
    frequency = make_sampler(frequency_penalty=0.3)
    assert [int(frequency(flat).item()) for _ in range(4)] == [0, 0, 1, 0]
    # presence 0.6 drops each token given once: 0 (3.0), 1 (2.5 > 2.4), then 0 (2.4 > 1.9 and > 1.0)
    presence = make_sampler(presence_penalty=0.6)
    assert [int(presence(flat).item()) for _ in range(4)] == [0, 1, 0, 0]
    assert [int(make_sampler()(flat).item()) for _ in range(3)] == [0, 0, 0]  # none: argmax every time


def test_penalties_count_each_row_of_a_batch_apart() -> None:
    logits = mx.array([[3.0, 2.9, 0.0], [0.0, 3.0, 2.9]])
    sampler = make_sampler(presence_penalty=1.0)
    assert [sampler(logits).tolist() for _ in range(2)] == [[0, 1], [1, 2]]
