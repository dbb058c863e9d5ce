"""`exo doctor` and `exo cleanup`, run as the real command against real processes: a deliberately orphaned
runner, and the session's real node with its runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from nodes import RunningNode, free_ports

from exo import kernels
from exo.config import Config
from exo.doctor.processes import Proc, classify
from exo.doctor.report import ApiStatus, Browse, IssueKind, OrphanedRunner, Report, find_issues
from exo.doctor.secrets import redact, redact_args, scrub, secret_values
from exo.worker.runner.process import command

PY = sys.executable
SPEC = json.dumps({"node_id": "doctor-test", "instance_id": "orphan0doctor", "rank": 0, "world_size": 1,
                   "model_path": "", "start": 0, "end": 1, "n_layers": 1, "dtype": "float32"})


def exo(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "exo.main", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def verdict(out: subprocess.CompletedProcess[str]) -> str:
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: "), out.stdout + out.stderr
    return last.removeprefix("verdict: ")


def doctor_json(*args: str) -> tuple[int, dict[str, Any]]:
    out = exo("doctor", "--json", "--no-browse", *args)
    return out.returncode, json.loads(out.stdout)


@pytest.fixture
def orphan(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real runner process (`-m exo.worker.runner SPEC NODE_PID`) whose NODE_PID, this test process, is no
    exo node: what a runner looks like once its node is gone and the pid taken by another program. (A runner
    whose node pid is dead cannot be made on Linux: it checks at start that its node is its parent, and the
    kernel kills it when that parent dies.) It waits on the stdin this fixture holds open; always killed."""
    with (tmp_path / "runner.log").open("wb") as log:
        process = subprocess.Popen(command(SPEC, os.getpid()), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        assert process.stdin is not None
        process.stdin.close()


def test_doctor_reports_an_orphaned_runner_and_cleanup_stops_it(orphan: subprocess.Popen[bytes]) -> None:
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"

    found = exo("doctor", "--url", url, "--no-browse")
    assert found.returncode == 1, found.stdout + found.stderr
    assert verdict(found).startswith("orphaned runners found")
    assert f"  orphan pid={orphan.pid} runner=orphan0doctor.0 node_pid={os.getpid()} " in found.stdout
    assert f"issue: orphaned runners found: pid={orphan.pid} " in found.stdout

    cleaned = exo("cleanup")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert f"stopped orphan pid={orphan.pid} runner=orphan0doctor.0" in cleaned.stdout
    assert orphan.wait(timeout=10) < 0  # ended by a signal
    assert not psutil.pid_exists(orphan.pid)

    code, report = doctor_json("--url", url)
    assert code == 1 and report["orphans"] == [], report["orphans"]
    assert "orphaned" not in report["verdict"] and report["verdict"].startswith(("no exo node running",
                                                                                 "node API not answering"))
    again = exo("cleanup")
    assert again.returncode == 0 and again.stdout.strip() == "cleanup: no orphaned runners"


@pytest.mark.slow
def test_doctor_finds_the_node_and_its_runner_and_no_issues(node: RunningNode) -> None:
    runners = {r["pid"]: r for r in node.state()["runners"].values() if r["nodeId"] == node.state()["nodeId"]}
    assert runners and None not in runners

    start = time.monotonic()
    text = exo("doctor", "--url", node.url)  # with the mDNS browse, which must stay short
    took = time.monotonic() - start
    assert text.returncode == 0 and verdict(text) == "no issues", text.stdout + text.stderr
    [line] = [line for line in text.stdout.splitlines() if line.startswith(f"  node pid={node.process.pid} ")]
    assert f"ports={node.port}" in line and "discovery=off" in line  # the fixture's node runs --no-discovery
    for pid, runner in runners.items():
        assert f"    runner pid={pid} runner={runner['instanceId']}.{runner['rank']} status=" in text.stdout
    assert " browse saw " in text.stdout or " browse failed " in text.stdout  # no multicast: reported, not fatal
    assert took < 10

    code, report = doctor_json("--url", node.url)
    assert code == 0 and report["verdict"] == "no issues" and report["issues"] == []
    [me] = [n for n in report["nodes"] if n["pid"] == node.process.pid]
    assert node.port in me["ports"] and me["discovery"] is False and me["rss"] > 0
    assert {r["pid"] for r in me["runners"]} == set(runners)
    assert not set(runners) & {o["pid"] for o in report["orphans"]}
    assert report["rss_total"] >= me["rss"] + sum(r["rss"] for r in me["runners"])
    assert report["api"]["answering"] and report["api"]["health"]["status"] == "ok"
    state = httpx.get(f"{node.url}/state").json()
    assert report["cluster"]["master_id"] == state["nodeId"] == report["cluster"]["node_id"]
    assert report["cluster"]["peers"] == [] and report["browse"] == {"ran": False, "seconds": 0.0, "services": [],
                                                                       "error": None}



def test_state_and_doctor_say_which_kernel_path_the_node_runs(node: RunningNode) -> None:
    state = httpx.get(f"{node.url}/state").json()
    profile = state["nodes"][state["nodeId"]]
    chosen = kernels.info()  # the node runs from this test's environment, so it chooses the same
    assert (profile["kernelPath"], profile["kernelReason"]) == (chosen.path, chosen.reason)

    text = exo("doctor", "--url", node.url, "--no-browse")
    assert f" kernels={chosen.path}" in text.stdout and f"  kernels: {chosen.reason}" in text.stdout, text.stdout
    code, report = doctor_json("--url", node.url, "--no-browse")
    assert code == 0
    assert (report["cluster"]["kernel_path"], report["cluster"]["kernel_reason"]) == (chosen.path, chosen.reason)

@pytest.mark.slow
def test_bundle_holds_versions_config_report_logs_and_state_and_no_secret(node: RunningNode, tmp_path: Path) -> None:
    secrets = {"EXO_API_KEY": "doctor-test-api-key-81f3", "EXO_CLUSTER_SECRET": "doctor-test-cluster-secret-77aa"}
    path = tmp_path / "support.tar.gz"

    out = exo("doctor", "--url", node.url, "--no-browse", "--bundle", str(path),
              env={**secrets, "EXO_LOG_FILE": str(node.log)})

    assert out.returncode == 0 and verdict(out) == "no issues", out.stdout + out.stderr
    assert f"bundle: {path}" in out.stdout
    with tarfile.open(path, "r:gz") as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert set(members) == {"versions.json", "config.json", "report.json", "report.txt", "logs.txt",
                            "state.json", "health.json"}
    for name, data in members.items():
        for secret in secrets.values():
            assert secret.encode() not in data, name
    assert all(secret.encode() not in path.read_bytes() for secret in secrets.values())
    config = json.loads(members["config.json"])
    assert config["api_key"] == config["cluster_secret"] == "***"
    versions = json.loads(members["versions.json"])
    assert versions["exo"] == versions["node"] and versions["libraries"]["mlx"]
    assert json.loads(members["state.json"])["nodeId"] == json.loads(members["health.json"])["node_id"]
    assert json.loads(members["report.json"])["verdict"] == "no issues"
    assert members["logs.txt"].startswith(f"# source: {node.log}\n".encode()) and b"runner=" in members["logs.txt"]
    assert path.stat().st_mode & 0o077 == 0  # the owner's alone


# -- what the command builds on, without processes -----------------------------------------------------------------

NODE = 100
NODE_CMD = (PY, "-m", "exo.main", "--api-port", "52415")


def runner(pid: int, node_pid: int, ppid: int | None = None) -> Proc:
    return Proc(pid, node_pid if ppid is None else ppid, tuple(command(SPEC, node_pid)))


@pytest.mark.parametrize(("procs", "nodes", "orphans"), [
    ([Proc(NODE, 1, NODE_CMD), runner(101, NODE)], {NODE: [101]}, {}),
    ([runner(101, 99, ppid=1)], {}, {101: "node pid=99 is gone"}),
    ([Proc(NODE, 1, ("/usr/bin/vim",)), runner(101, NODE)], {}, {101: "pid=100 is not an exo node: /usr/bin/vim"}),
    # the node died, the runner went to init, and a new node took the pid: not its runner
    ([Proc(NODE, 1, NODE_CMD), runner(101, NODE, ppid=1)], {NODE: []},
     {101: "its parent pid=1 is not its node pid=100"}),
    # tools are not nodes: this doctor, other exo commands, help; flags' values are not commands
    ([Proc(NODE, 1, (PY, "-m", "exo.main", "-v", "doctor", "--json")), runner(101, NODE)], {},
     {101: "pid=100 is not an exo node: "}),
    ([Proc(200, 1, (PY, "/venv/bin/exo", "bench", "--runs", "1")),
      Proc(201, 1, ("/venv/bin/exo", "--help")),
      Proc(202, 1, (PY, "/venv/bin/exo", "--cluster", "doctor", "--no-discovery")),
      Proc(203, 1, ("/venv/bin/exo", "--model=bench", "--peers", "a:1")),
      Proc(204, 1, (PY, "-m", "exo.main", "cleanup"))], {202: [], 203: []}, {}),
    ([Proc(os.getpid(), 1, NODE_CMD)], {}, {}),  # never itself
])
def test_classify_finds_nodes_runners_and_orphans_by_marker_only(
        procs: list[Proc], nodes: dict[int, list[int]], orphans: dict[int, str]) -> None:
    not_a_runner = Proc(7, 1, ("python", "exo.worker.runner", SPEC, "100"))  # no `-m`: not the marker
    found, lost = classify([*procs, not_a_runner], os.getpid())
    assert {node.pid: [r.pid for r in runners] for node, runners in found} == nodes
    reasons = {p.pid: why for p, why in lost}
    assert set(reasons) == set(orphans) and all(reasons[pid].startswith(why) for pid, why in orphans.items()), reasons


def test_redaction_hides_secret_named_fields_flags_and_values() -> None:
    config = Config.from_env({"EXO_HOME": "/x", "EXO_API_KEY": "k3y-value-1-long-enough",
                              "EXO_CLUSTER_SECRET": "s3cret-value-long-enough"})
    data = redact(config)
    assert data["api_key"] == data["cluster_secret"] == "***" and data["home"] == "/x" and data["api_port"] == 52415
    assert redact({"token": None, "nested": [{"password": "p"}]}) == {"token": None, "nested": [{"password": "***"}]}
    assert redact_args(["--api-key", "k", "--cluster-secret=s", "--cluster-secret-file", "/etc/exo/secret",
                        "--api-port", "1"]) == ("--api-key", "***", "--cluster-secret=***", "--cluster-secret-file",
                                                "/etc/exo/secret", "--api-port", "1")
    assert secret_values(config, {"HF_TOKEN": "hf_abcdefgh", "EXO_CLUSTER_SECRET_FILE": "/etc/exo/secret"},
                         [("--api-key=flag-key-123", "--cluster-secret", "flag-secret-456")]) == {
        "k3y-value-1-long-enough", "s3cret-value-long-enough", "hf_abcdefgh", "flag-key-123", "flag-secret-456"}


def test_exo_secrets_are_scrubbed_whatever_their_length_short_ones_where_they_stand_alone() -> None:
    found = secret_values(None, {"EXO_API_KEY": "abc", "OTHER_TOKEN": "1", "EXO_CLUSTER_SECRET_FILE": "/s"},
                          [("--cluster-secret", "s1", "--api-key=k2")])
    assert found == {"abc", "s1", "k2"}  # another program's short value would scrub innocent text: left
    assert scrub('--api-key=abc "abc" fabcd abc.x s1 s12', found) == '--api-key=*** "***" fabcd abc.x *** s12'


def test_a_bundle_made_when_a_short_secret_stopped_the_node_holds_no_secret(tmp_path: Path) -> None:
    short, path, log = "sk-abc", tmp_path / "support.tar.gz", tmp_path / "node.log"
    log.write_text(f"$ exo --api-key {short}\nexo: --api-key: must be at least 16 characters\nEXO_API_KEY={short}\n")
    [port] = free_ports(1)

    out = exo("doctor", "--url", f"http://127.0.0.1:{port}", "--no-browse", "--bundle", str(path),
              env={"EXO_API_KEY": short, "EXO_LOG_FILE": str(log)})

    assert "the configuration in the environment is not valid: EXO_API_KEY: must be at least" in out.stderr
    assert short not in out.stdout + out.stderr and path.is_file(), out.stdout + out.stderr
    with tarfile.open(path, "r:gz") as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert all(short.encode() not in data for data in members.values())
    assert b"$ exo --api-key ***\n" in members["logs.txt"] and b"EXO_API_KEY=***" in members["logs.txt"]


def test_verdict_names_each_kind_of_issue_once_most_pressing_first() -> None:
    orphans = tuple(OrphanedRunner(pid=p, node_pid=9, runner_id="i.0", rss=0, reason="node pid=9 is gone")
                    for p in (1, 2))
    report = Report(version="0", host="h", platform="p", nodes=(), orphans=orphans, rss_total=0, memory_available=0,
                    api=ApiStatus(url="u", answering=False, error="connection refused"), cluster=None,
                    browse=Browse(ran=False))
    issues, _ = find_issues(report)
    assert [i.kind for i in issues] == [IssueKind.ORPHANED_RUNNERS] * 2 + [IssueKind.NO_NODE]
    assert report.model_copy(update={"issues": issues}).verdict == "orphaned runners found; no exo node running"
    assert report.verdict == "no issues"
