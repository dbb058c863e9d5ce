"""One rank of a pipeline ring, as a process of its own:
`python pipeline_rank.py HOSTFILE RANK START END MODEL [PREFIX_POSITIONS]`.

Every rank prints "ready" once it is in the ring with its layers loaded. Rank 0 then reads one
request a line from stdin, as JSON `{"prompt": [...], "max_tokens": n, "temperature": ..., ...}`,
and answers each with a line `{"tokens": [...], "reused": n, "timings": {...}}`, until stdin closes;
with PREFIX_POSITIONS it keeps a prefix cache of that many positions (`reused`: the prompt's
positions taken from it). The other ranks serve the ring until SIGTERM; one that loses a neighbour
exits with code 3.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
from itertools import islice
from pathlib import Path

from exo.engine.generate import GenerationParams
from exo.engine.loading import load
from exo.engine.pipeline import PipelineHead, Ring, serve
from exo.engine.prefix import PrefixCache

RING_LOST = 3


def main(hostfile: str, rank: str, start: str, end: str, model: str, prefix_positions: str = "0") -> int:
    ring = Ring.join(Path(hostfile), int(rank))
    loaded = load(Path(model), int(start), int(end))
    print("ready", flush=True)
    if ring.rank == 0:
        head = PipelineHead(loaded.model, ring, PrefixCache(int(prefix_positions)) if int(prefix_positions) else None)
        for line in sys.stdin:
            request = json.loads(line)
            prompt = request.pop("prompt")
            params = GenerationParams(**request)
            steps = head.generate_step(prompt, params)
            tokens = []
            for token in islice(steps, params.max_tokens):
                tokens.append(token)
                if token in loaded.tokenizer.eos_ids:
                    break
            steps.close()
            print(json.dumps({"tokens": tokens, "reused": head.reused, "timings": dataclasses.asdict(head.timings)}),
                  flush=True)
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve(loaded.model, ring, stop, {})
    except RuntimeError as e:
        print(f"ring lost: {e}", file=sys.stderr, flush=True)
        return RING_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
