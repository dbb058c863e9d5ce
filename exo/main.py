"""The `exo` command: parse flags into one Config, then run a node or a tool."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import get_args

from exo import __version__
from exo.config import DEFAULT_API_PORT, MIN_SECRET_LENGTH, Config, ConfigError, read_secret
from exo.engine.blas import Blas, find_blas, reexec_with
from exo.master.planner import DEFAULT_CONTEXT
from exo.models.cards import DEFAULT_MODEL
from exo.shared.types import CacheDtype, Dtype


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo", description="Run a node of an exo inference cluster.")
    parser.add_argument("--version", action="version", version=f"exo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and every request")
    parser.add_argument("--host", "--api-host", dest="api_host", metavar="HOST",
                        help="address the API listens on (default: 0.0.0.0, all of them)")
    parser.add_argument("--api-port", metavar="PORT", help=f"default: {DEFAULT_API_PORT}")
    parser.add_argument("--model", action="append", metavar="ID_OR_PATH",
                        help=f"load this model at start (repeatable; default: {DEFAULT_MODEL}); "
                             "a path to a .gguf file or a model directory serves a local model")
    parser.add_argument("--no-preload", action="store_true", help="load models on first request only")
    parser.add_argument("--dtype", choices=get_args(Dtype),
                        help="how weights are held in memory (default: quantized, as stored in the model file)")
    parser.add_argument("--kv-cache", choices=get_args(CacheDtype),
                        help="dtype of the attention's key/value cache (default: the activations', float32 for "
                             "quantized weights); float16 halves its memory")
    parser.add_argument("--context", metavar="TOKENS",
                        help="positions (prompt and completion) each instance this node places serves, within "
                             f"the model's own; the planner counts a key/value cache this long (default: "
                             f"{DEFAULT_CONTEXT})")
    parser.add_argument("--blas", choices=get_args(Blas),
                        help="BLAS preloaded for MLX's CPU backend (default: auto, the fastest installed)")
    parser.add_argument("--cluster", help="cluster name; nodes of other clusters are ignored (default: exo)")
    parser.add_argument("--peers", metavar="HOST:PORT,...",
                        help="peers' API addresses, for networks without multicast (also EXO_PEERS)")
    parser.add_argument("--no-discovery", action="store_true", help="do not use mDNS to find peers")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="memory this node offers to exo, e.g. 2GB (default: all available)")
    parser.add_argument("--peer-timeout", metavar="SECONDS", help="drop a peer unheard for this long (default: 3)")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--cluster-secret", metavar="SECRET",
                        help="shared secret every node of the cluster proves it holds; nodes without it are "
                             f"refused; at least {MIN_SECRET_LENGTH} characters (also EXO_CLUSTER_SECRET; "
                             "default: none, any node on the network may join)")
    secret.add_argument("--cluster-secret-file", type=_secret_file, dest="cluster_secret", metavar="PATH",
                        help="read the cluster secret from this file (also EXO_CLUSTER_SECRET_FILE)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require `Authorization: Bearer KEY` on every endpoint but /health and the dashboard "
                             "page; give every node of the cluster the same key, at least "
                             f"{MIN_SECRET_LENGTH} characters (also EXO_API_KEY)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    models = commands.add_parser("models", help="list the models exo knows, or fetch one into the cache")
    models.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    models.add_argument("model_id", nargs="?", default=DEFAULT_MODEL)
    from exo import bench, bench_cluster

    bench.add_arguments(commands.add_parser("bench", help="measure prompt and decode speed of a model"))
    bench_cluster.add_arguments(commands.add_parser(
        "bench-cluster", help="measure a model split over 1, 2, 4 ... real nodes on this host"))
    from exo import soak

    soak.add_arguments(commands.add_parser(
        "soak", help="run real nodes on this host under random load, cancels and restarts; report what was lost"))
    from exo import doctor

    doctor.add_arguments(commands.add_parser(
        "doctor", help="check exo on this machine: node, runners, orphans, ports, memory, peers; exit 1 on issues",
        description="Report this machine's exo node and its runners, orphaned runners, their ports and memory, "
                    "the node's API, peers and discovery, and end with one line: `verdict: no issues` (exit 0) "
                    "or the issues found (exit 1)."))
    commands.add_parser("cleanup", help="stop exo's orphaned runners (whose node is gone), freeing their ports",
                        description="Stop every runner whose node is gone (SIGTERM, then SIGKILL after 5 s), "
                                    "found by exo's runner marker only, and print the pids and ports freed.")
    return parser


def _secret_file(path: str) -> str:
    try:
        return read_secret(path)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO, one per heartbeat to each peer: only -v shows them
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if args.command in ("doctor", "cleanup"):
        from exo import doctor

        return doctor.run_doctor(args, os.environ) if args.command == "doctor" else doctor.run_cleanup()
    try:  # flags and environment are checked alike: a bad value is one line, exit 2
        config = Config.from_env(**_flags(args)) if args.command in (None, "models") else Config.from_env()
    except ConfigError as e:
        print(f"exo: {e}", file=sys.stderr)
        return 2
    if args.command == "bench":
        from exo import bench

        return bench.run(args, config.models_dir)
    if args.command == "bench-cluster":
        from exo import bench_cluster

        return bench_cluster.run(args, config.models_dir)
    if args.command == "soak":
        from exo import soak

        return soak.run(args, config.models_dir)
    if args.command == "models":
        return _models(config, args.action, args.model_id)
    return _serve(config)


def _flags(args: argparse.Namespace) -> dict[str, object]:
    """The node's settings given as flags; None where a flag is not given, so EXO_<NAME> or the default holds."""
    return {"api_host": args.api_host, "api_port": args.api_port, "verbose": args.verbose or None,
            "preload": () if args.no_preload else args.model and tuple(args.model), "dtype": args.dtype,
            "kv_cache": args.kv_cache, "context": args.context, "blas": args.blas, "cluster": args.cluster,
            "peers": args.peers,
            "discovery": False if args.no_discovery else None, "max_memory": args.max_memory,
            "peer_timeout": args.peer_timeout, "cluster_secret": args.cluster_secret, "api_key": args.api_key}


def _serve(config: Config) -> int:
    if library := find_blas(config.blas):
        reexec_with(library)  # returns only once the library is preloaded
    import anyio

    from exo.node import Node
    from exo.shared.errors import ExoError

    log = logging.getLogger("exo")
    log.info("exo %s: API on http://%s:%d, BLAS %s", __version__, config.api_host, config.api_port,
             library or "bundled with MLX")
    try:
        node = Node(config)
    except ExoError as e:  # a --model that names nothing
        print(f"exo: {e.message}", file=sys.stderr)
        return 2
    anyio.run(node.run)
    return 0


def _models(config: Config, action: str, model_id: str) -> int:
    from exo.models.cards import CARDS
    from exo.models.store import ModelStore

    store = ModelStore(config.models_dir)
    if action == "fetch":
        if model_id not in CARDS:
            print(f"exo: unknown model {model_id!r}; `exo models` lists them", file=sys.stderr)
            return 2
        print(store.ensure(CARDS[model_id]))
        return 0
    for card in CARDS.values():
        state = "downloaded" if store.is_present(card) else "not downloaded"
        print(f"{card.id:24} {card.name:32} {card.bytes / 1e6:6.0f} MB  {card.n_layers:3d} layers  {state:14}  "
              f"license: {card.license}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
