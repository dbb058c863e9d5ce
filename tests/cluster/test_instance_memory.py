"""A real node places copies of a model only while the memory of the instances already placed leaves room,
counting each one's weights and the key/value cache of the context it serves, which its API enforces."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from nodes import answers, start_node, stop_node, untag, wait_for

from exo.models.cards import CARDS, DEFAULT_MODEL

pytestmark = pytest.mark.slow


def test_placing_copies_past_the_memory_of_placed_instances_is_refused_and_the_node_serves_on(
        tmp_path: Path, models_dir: Path) -> None:
    # Quantized, a copy serving 256 positions takes its file's size, a float32 cache of 256 positions
    # in 30 layers (12 MB) and as much for its prefix cache, headroom and a runner's reserve (about
    # 285 MB): two fit in 600 MB. Serving the model's whole context (8192), the caches would take 755 MB.
    card = CARDS[DEFAULT_MODEL]
    assert card.bytes < 100_000_000 and card.n_layers * card.kv_width * 4 * 256 < 12_000_000
    node = start_node(tmp_path, models_dir, "--no-discovery", "--no-preload", "--dtype", "quantized",
                      "--max-memory", "600MB", "--context", "256")
    try:
        wait_for(lambda: answers(node) and node.state()["masterId"] is not None, 60, "the node to be master")
        whole = httpx.post(f"{node.url}/place_instance", json={"model_id": DEFAULT_MODEL, "context": 100_000},
                           timeout=10)
        assert whole.status_code == 409, whole.text  # capped at the model's 8192, still too long for 600 MB
        assert "key/value caches for 8192 tokens" in whole.json()["error"]["message"]
        assert "lower --context" in whole.json()["error"]["message"]
        placed = []
        for _ in range(2):  # at once, before any runner has loaded and memory available shows it
            answer = httpx.post(f"{node.url}/place_instance", json={"model_id": DEFAULT_MODEL}, timeout=10)
            assert answer.status_code == 200, answer.text
            assert untag(answer.json())["context"] == 256
            placed.append(untag(answer.json())["instanceId"])

        refused = httpx.post(f"{node.url}/place_instance", json={"model_id": DEFAULT_MODEL}, timeout=10)

        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["type"] == "placement_refused" and "instances already placed take" in error["message"]
        assert set(node.state()["instances"]) == set(placed)
        previews = httpx.get(f"{node.url}/instance/previews", params={"model_id": DEFAULT_MODEL}, timeout=10)
        assert previews.status_code == 200 and previews.json()["previews"] == [], previews.text
        wait_for(lambda: httpx.get(f"{node.url}/health").json()["runners_ready"] == 2, 120, "both copies to load")
        again = httpx.post(f"{node.url}/place_instance", json={"model_id": DEFAULT_MODEL}, timeout=10)
        assert again.status_code == 409, again.text  # loaded copies still count
        chat = httpx.post(f"{node.url}/v1/chat/completions", timeout=120, json={
            "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert chat.status_code == 200, chat.text
        prompt = chat.json()["usage"]["prompt_tokens"]
        too_long = httpx.post(f"{node.url}/v1/chat/completions", timeout=120, json={
            "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 257 - prompt})
        assert too_long.status_code == 400, too_long.text  # the context the instances were placed for
        assert f"only {256 - prompt} tokens are left in the context of 256" in too_long.json()["error"]["message"]

        assert httpx.delete(f"{node.url}/instance/{placed[0]}", timeout=10).status_code == 200
        wait_for(lambda: len(node.state()["instances"]) == 1, 30, "the instance to be deleted")
        assert httpx.post(f"{node.url}/place_instance", json={"model_id": DEFAULT_MODEL},
                          timeout=10).status_code == 200  # its memory is free again
    finally:
        assert stop_node(node) == 0, node.log_tail()
