"""One node's own model, served by two: the node that lacks the file fetches its layers from the one that has it.

Two real nodes on loopback with a cluster secret and separate model directories: node A serves a copy of
the default model's GGUF file with `--model PATH` (its preload places it on A alone, the reference
answers); node B has no model at all. Placed across both by hand, B fetches only the pieces its layer
range reads, checked against their sha256, and the split answers exactly as A alone did. The fetcher is
also driven directly against A (a fetch cut short resumes; a damaged piece is refused) and A's model
routes are probed for their proof.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nodes import (
    RunningNode,
    answers,
    assert_clean_log,
    free_ports,
    start_node,
    static_peers,
    stop_node,
    wait_for,
)

from exo import local_cluster
from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.models.peers import PIECE_BYTES, Holder, Manifest, PeerFetcher, signed_frame
from exo.net.auth import HEADER, ClusterAuth
from exo.shared.errors import ModelFetchError
from exo.shared.state import SharedModel

pytestmark = pytest.mark.slow

SECRET = "peer-models-secret"
MODEL = "own-smollm2"
N_LAYERS = CARDS[DEFAULT_MODEL].n_layers
PROMPT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A copy of the default model's file under a name of its own, as a user's GGUF would be."""
    original = models_dir / DEFAULT_MODEL / CARDS[DEFAULT_MODEL].filename
    copy = tmp_path_factory.mktemp("own") / f"{MODEL}.gguf"
    shutil.copyfile(original, copy)
    return copy


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Iterator[list[RunningNode]]:
    """A (holding the file) and B (holding nothing), each with its own models directory."""
    root = tmp_path_factory.mktemp("peers")
    ports = free_ports(2)
    nodes = [start_node(root / name, root / f"models-{name}", "--cluster-secret", SECRET, *static_peers(i, ports),
                        *(["--model", str(source)] if name == "a" else ["--no-preload"]), port=ports[i])
             for i, name in enumerate("ab")]
    try:
        wait_for(lambda: all(answers(n) for n in nodes), 30, "the nodes answer")
        wait_for(lambda: all(len(n.state()["nodes"]) == 2 and n.state()["masterId"] for n in nodes), 30,
                 "both nodes agree on a master")
        wait_for(lambda: any(r["status"] == "Ready" for r in nodes[0].state()["runners"].values()), 120,
                 "A's own model to be ready on A")
        yield nodes
    finally:
        codes = [stop_node(node) for node in nodes]
        for node in nodes:
            assert_clean_log(node)
        assert codes == [0, 0], [node.log_tail() for node in nodes]


def ask(node: RunningNode) -> str:
    body = {"model": MODEL, "messages": PROMPT, "temperature": 0, "max_tokens": 16}
    response = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def instances(node: RunningNode) -> list[dict[str, Any]]:
    return [local_cluster.untag(i) for i in node.state()["instances"].values()]


def delete_all(nodes: list[RunningNode]) -> None:
    for instance in instances(nodes[0]):
        assert httpx.delete(f"{nodes[0].url}/instance/{instance['instanceId']}", timeout=10).status_code == 200
    wait_for(lambda: all(not n.state()["runners"] for n in nodes), 30, "every runner to leave")


def copy_on(node: RunningNode) -> Path:
    [version] = [d for d in (node.home.parent / f"models-{node.home.name}" / ".peers" / MODEL).iterdir() if d.is_dir()]
    return version / f"{MODEL}.gguf"


def held_pieces(copy: Path) -> list[str]:
    return (copy.parent / f".{copy.name}.pieces").read_text().splitlines()


@pytest.fixture(scope="module")
def alone(pair: list[RunningNode]) -> str:
    """The answer of A's own instance (its preload), the whole model in one runner."""
    return ask(pair[0])


def test_a_split_across_a_node_without_the_file_answers_as_the_holder_alone(pair: list[RunningNode],
                                                                             source: Path, alone: str) -> None:
    a, b = pair
    models = {m["id"]: m for m in httpx.get(f"{b.url}/v1/models", timeout=5).json()["data"]}
    assert models[MODEL]["downloaded"] is False, "B lists A's model, not held here"
    delete_all(pair)

    instance_id = local_cluster.place(pair, [b, a], MODEL, [(0, 12), (12, N_LAYERS)], timeout=120)
    assert ask(b) == alone
    assert ask(a) == alone
    download = b.state()["runners"][f"{instance_id}.0"]["download"]
    assert download["fromNode"] == a.state()["nodeId"]
    assert download["bytesDone"] == download["bytesTotal"] < source.stat().st_size
    copy = copy_on(b)
    assert copy.stat().st_size == source.stat().st_size
    assert copy.stat().st_blocks * 512 < 0.8 * source.stat().st_size, "the copy holds only what its range reads"
    first = held_pieces(copy)
    assert len(first) * PIECE_BYTES >= download["bytesTotal"]
    delete_all(pair)

    # The other end of the model on B: the header and tied embedding are there already.
    manifest = fetch_manifest(a, (12, N_LAYERS))
    needed = {f"{p.offset} {p.length} {p.sha256}" for p in manifest.files[0].pieces}
    local_cluster.place(pair, [a, b], MODEL, [(0, 12), (12, N_LAYERS)], timeout=120)
    assert ask(a) == alone
    added = held_pieces(copy)[len(first):]
    assert set(added) == needed - set(first) and needed & set(first), "only the pieces B lacked were fetched"
    delete_all(pair)


def test_the_master_places_another_nodes_model_first_where_its_files_are(pair: list[RunningNode],
                                                                          alone: str) -> None:
    a, b = pair
    delete_all(pair)
    assert ask(b) == alone, "a chat for it through B places it"
    [instance] = instances(a)
    assert [s["nodeId"] for s in instance["shards"]] == [a.state()["nodeId"]], "on A alone: nothing to fetch"
    delete_all(pair)

    answer = httpx.post(f"{b.url}/place_instance", json={"model_id": MODEL, "min_nodes": 2}, timeout=15)
    assert answer.status_code == 200, answer.text
    assert {s["nodeId"] for s in local_cluster.untag(answer.json())["shards"]} == {a.state()["nodeId"],
                                                                                    b.state()["nodeId"]}
    assert ask(b) == alone
    delete_all(pair)


def fetch_manifest(node: RunningNode, layers: tuple[int, int] | None, auth: ClusterAuth | None = None) -> Manifest:
    params = f"?start={layers[0]}&end={layers[1]}" if layers else ""
    line = f"/cluster/models/{MODEL}/manifest{params}"
    response = httpx.get(node.url + line, headers=proof(node, line, auth), timeout=30)
    assert response.status_code == 200, response.text
    return Manifest.model_validate_json(response.content)


def proof(node: RunningNode, line: str, auth: ClusterAuth | None = None) -> dict[str, str]:
    auth = auth or ClusterAuth(SECRET, node_id="tester", cluster="exo")
    return {HEADER: auth.sign(signed_frame("GET", line), node.state()["nodeId"])}


def test_model_routes_take_only_requests_that_prove_the_cluster_secret(pair: list[RunningNode]) -> None:
    a, _ = pair
    line = f"/cluster/models/{MODEL}/manifest"
    bare = httpx.get(a.url + line, timeout=10)
    wrong = httpx.get(a.url + line, headers=proof(a, line, ClusterAuth("other", node_id="tester", cluster="exo")),
                      timeout=10)
    headers = proof(a, line)
    good = httpx.get(a.url + line, headers=headers, timeout=10)
    replayed = httpx.get(a.url + line, headers=headers, timeout=10)
    other_line = httpx.get(a.url + line + "?start=0&end=1", headers=proof(a, line), timeout=10)
    assert [r.status_code for r in (bare, wrong, good, replayed, other_line)] == [401, 401, 200, 401, 401]
    assert bare.json()["error"]["code"] == "invalid_cluster_proof"
    header_only = Manifest.model_validate_json(good.content)
    assert sum(p.length for p in header_only.files[0].pieces) < 4 * PIECE_BYTES, "the header alone, in pieces"

    bad = [f"/cluster/models/{MODEL}/piece?file={MODEL}.gguf&offset={1 << 40}&length=16",
           f"/cluster/models/{MODEL}/piece?file=..%2F..%2Fetc%2Fpasswd&offset=0&length=16",
           f"/cluster/models/{MODEL}/manifest?start=0&end={N_LAYERS + 1}",
           "/cluster/models/no-such-model/manifest"]
    statuses = []
    for request in bad:
        response = httpx.get(a.url + request, headers=proof(a, request), timeout=10)
        assert "error" in response.json(), response.text
        statuses.append(response.status_code)
    assert statuses == [400, 404, 400, 404]


class Cut(Exception):
    pass


def test_a_fetch_cut_short_resumes_and_a_damaged_piece_is_refused(pair: list[RunningNode], source: Path,
                                                                 tmp_path: Path) -> None:
    a, _ = pair
    shared = SharedModel.model_validate(next(m for m in a.state()["nodes"][a.state()["nodeId"]]["models"]
                                             if m["modelId"] == MODEL))
    holder = Holder(a.state()["nodeId"], a.url, shared)
    fetcher = PeerFetcher(tmp_path / "models", lambda _: [holder], ClusterAuth(SECRET, node_id="tester",
                                                                               cluster="exo"))
    layers = (0, 10)
    calls: list[tuple[int, int]] = []

    def cut_after_three(done: int, total: int, _: str) -> None:
        calls.append((done, total))
        if len(calls) == 4:  # the first call says what is held; then one per piece
            raise Cut

    with pytest.raises(Cut):
        fetcher.ensure(MODEL, layers, cut_after_three)
    three = calls[-1][0]
    calls.clear()
    path = fetcher.ensure(MODEL, layers, lambda done, total, _: calls.append((done, total)))
    pieces = fetch_manifest(a, layers).files[0].pieces
    assert calls[0] == (three, sum(p.length for p in pieces)), "the resumed fetch starts from the pieces held"
    assert len(calls) - 1 == len(pieces) - 3, "and fetches only the others"
    assert calls[-1][0] == calls[-1][1]
    calls.clear()
    assert fetcher.ensure(MODEL, layers, lambda done, total, _: calls.append((done, total))) == path
    assert calls == [(calls[0][1], calls[0][1])], "a range held already is there at once"

    # A piece damaged on the way (here: at its source, its time kept, so the manifest still says the old hash).
    held = (path.parent / f".{path.name}.pieces").read_text().splitlines()
    last = [p for p in fetch_manifest(a, (20, N_LAYERS)).files[0].pieces
            if f"{p.offset} {p.length} {p.sha256}" not in held][-1]  # one the copy lacks
    stat = source.stat()
    original = source.read_bytes()[last.offset: last.offset + 16]
    with source.open("r+b") as f:
        f.seek(last.offset)
        f.write(bytes(16))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        with pytest.raises(ModelFetchError, match="checksum"):
            fetcher.ensure(MODEL, (20, N_LAYERS))
        assert f"{last.offset} {last.length} {last.sha256}" not in (path.parent / f".{path.name}.pieces").read_text()
    finally:
        with source.open("r+b") as f:
            f.seek(last.offset)
            f.write(original)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fetcher.ensure(MODEL, (20, N_LAYERS)) == path
