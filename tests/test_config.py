"""Settings: flags and EXO_<NAME> variables are validated alike, a bad one is one line and exit 2 from the
real `exo` command; secrets are long enough and stay out of the runners' environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from nodes import answers, free_ports, runner_pids, start_node, stop_node, wait_for

from exo.config import MIN_SECRET_LENGTH, Config, ConfigError
from exo.models.cards import CARDS, DEFAULT_MODEL

KEY, SECRET = "sk-config-test-api-key-0123", "config-test-cluster-secret-4567"


def test_every_setting_comes_from_its_exo_variable_and_a_flag_wins() -> None:
    config = Config.from_env({"EXO_HOME": "/x", "EXO_BLAS": "openblas", "EXO_DTYPE": "bfloat16",
                              "EXO_PEERS": "a:1,[::1]:2", "EXO_MAX_MEMORY": "2GB", "EXO_PRELOAD": "m1,m2",
                              "EXO_QUEUE_LIMIT": "4", "EXO_DEBUG_COORDINATION": "1", "EXO_API_KEY": KEY,
                              "EXO_LOG_FILE": "/not/a/setting", "EXO_KV_CACHE": "float16"},
                             blas="bundled", queue_limit=None)
    assert (config.home, config.models_dir) == (Path("/x"), Path("/x/models"))
    assert (config.blas, config.dtype, config.queue_limit, config.max_memory) == ("bundled", "bfloat16", 4, 2 * 10**9)
    assert config.peers == (("a", 1), ("::1", 2)) and config.preload == ("m1", "m2") and config.debug_coordination
    assert config.api_key == KEY and KEY not in repr(config) and config.kv_cache == "float16"
    assert Config.from_env({}).cluster_secret is None and Config.from_env({}).preload == Config().preload


@pytest.mark.parametrize(("env", "flags", "says"), [
    ({"EXO_BLAS": "mkl"}, {}, "EXO_BLAS='mkl': input should be 'auto', 'blis', 'openblas' or 'bundled'"),
    ({"EXO_DTYPE": "fp8"}, {}, "EXO_DTYPE='fp8': input should be 'float32'"),
    ({}, {"kv_cache": "int4"}, "--kv-cache='int4': input should be 'float32' or 'float16'"),
    ({"EXO_QUEUE_LIMIT": "0"}, {}, "EXO_QUEUE_LIMIT='0': input should be greater than or equal to 1"),
    ({"EXO_PEERS": "a:1,b"}, {}, "EXO_PEERS='a:1,b': peer 'b' is not host:port"),
    ({}, {"max_memory": "2XB"}, "--max-memory='2XB': not a size such as 2GB"),
    ({"EXO_API_KEY": "short"}, {}, f"EXO_API_KEY: must be at least {MIN_SECRET_LENGTH} characters"),
    ({}, {"cluster_secret": "short"}, f"--cluster-secret: must be at least {MIN_SECRET_LENGTH} characters"),
    ({}, {"no_such_setting": 1}, "--no-such-setting: no such setting"),
])
def test_a_bad_setting_is_one_line_naming_its_flag_or_variable(env: dict[str, str], flags: dict[str, object],
                                                                says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env, **flags)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert "short" not in str(caught.value)  # a secret's value is never echoed


def test_a_secret_file_that_cannot_be_read_or_is_short_is_named(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    with pytest.raises(ConfigError, match="EXO_CLUSTER_SECRET_FILE: .*No such file"):
        Config.from_env({"EXO_CLUSTER_SECRET_FILE": str(secret)})
    secret.write_text("tiny\n")
    with pytest.raises(ConfigError, match=f"EXO_CLUSTER_SECRET_FILE: must be at least {MIN_SECRET_LENGTH}"):
        Config.from_env({"EXO_CLUSTER_SECRET_FILE": str(secret)})


@pytest.mark.parametrize(("env", "args", "says"), [
    ({"EXO_BLAS": "mkl"}, [], "exo: EXO_BLAS='mkl': input should be"),
    ({"EXO_DTYPE": "fp8"}, [], "exo: EXO_DTYPE='fp8': input should be"),
    ({"EXO_CLUSTER_SECRET": "short"}, [], f"exo: EXO_CLUSTER_SECRET: must be at least {MIN_SECRET_LENGTH}"),
    ({}, ["--api-key", "short"], f"exo: --api-key: must be at least {MIN_SECRET_LENGTH} characters"),
    ({}, ["--peer-timeout", "soon"], "exo: --peer-timeout='soon': input should be a valid number"),
])
def test_the_exo_command_refuses_a_bad_setting_in_one_line_with_exit_2(env: dict[str, str], args: list[str],
                                                                       says: str, tmp_path: Path) -> None:
    [port] = free_ports(1)
    out = subprocess.run([sys.executable, "-m", "exo.main", "--no-discovery", "--no-preload", "--api-host", "127.0.0.1",
                          "--api-port", str(port), *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "EXO_HOME": str(tmp_path), **env})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith(says) and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "short" not in out.stderr


def test_runners_get_the_kv_cache_setting_but_neither_the_api_key_nor_the_cluster_secret(
        tmp_path: Path, models_dir: Path) -> None:
    node = start_node(tmp_path, models_dir, "--no-discovery", "--kv-cache", "float16",
                      env={"EXO_API_KEY": KEY, "EXO_CLUSTER_SECRET": SECRET})
    try:
        wait_for(lambda: answers(node) and httpx.get(f"{node.url}/health").json()["runners_ready"] == 1, 120,
                 "the node's runner to be ready")
        [runner] = runner_pids(node.process.pid)
        env = psutil.Process(runner).environ()
        assert "EXO_API_KEY" not in env and "EXO_CLUSTER_SECRET" not in env
        assert KEY not in str(env) and SECRET not in str(env)
        assert psutil.Process(node.process.pid).environ()["EXO_API_KEY"] == KEY  # the node itself has it
        spec = json.loads(psutil.Process(runner).cmdline()[-2])  # python -m exo.worker.runner SPEC PARENT
        assert spec["kvCache"] == "float16"
        chat = httpx.post(f"{node.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"model": DEFAULT_MODEL, "max_tokens": 8, "temperature": 0,
                                "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"], chat.text
    finally:
        assert stop_node(node) == 0, node.log_tail()


def test_weights_are_held_quantized_by_default_and_sized_as_the_file_for_placement() -> None:
    default = Config.model_fields["dtype"].default
    card = CARDS[DEFAULT_MODEL]
    assert default == "quantized"
    assert card.memory_bytes(default) == card.bytes  # as stored: 98 MB for the Q4_1 file
    assert card.memory_bytes("float32") > 4 * card.bytes  # what it would take dequantized
