"""Greedy tokens of the default model in a process of its own: `python kernel_tokens.py MODEL N PROMPT...`.

Prints one JSON line: exo.kernels' path in this process and, per prompt, the N greedy tokens after it
with the margin between the two highest logits at each step (a small margin is a near-tie, where
two code paths may pick differently without either being wrong). EXO_KERNELS in the environment
chooses the kernels as it does for a node.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx

from exo import kernels
from exo.engine.loading import load


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:  # type: ignore[no-untyped-def]
    cache, tokens, margins = model.make_cache(), [], []
    inputs = mx.array([prompt])
    for _ in range(n):
        logits = model(inputs, cache)[0, -1]
        top2 = mx.sort(logits)[-2:]
        token = int(mx.argmax(logits).item())
        tokens.append(token)
        margins.append((top2[1] - top2[0]).item())
        inputs = mx.array([[token]])
    return tokens, margins


def main(model_path: str, n: str, *prompts: str) -> None:
    loaded = load(Path(model_path))
    tok = loaded.tokenizer
    runs = [greedy(loaded.model, tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])), int(n))
            for p in prompts]
    print(json.dumps({"path": kernels.info().path, "runs": [{"tokens": t, "margins": m} for t, m in runs]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
