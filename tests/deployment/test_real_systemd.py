"""The documented deployment (docs/deployment.md), command for command, under a real systemd: a minimal
Debian booted in a container (debootstrap, then `systemd-nspawn -b`), driven with `nsenter` (the host's
PID 1 need not be systemd). It installs exo's wheel with pip (its dependencies from the host's index),
starts the unit, chats, stops it idle and with a stream in flight, SIGKILLs it, deploys, rolls back and
validates; then powers the container off. Nothing of it outlives the test: the container runs on a
throw-away copy of a root file system cached in ~/.cache/exo-test-rootfs, removed at the end.

Needs root, debootstrap and systemd-nspawn (deployment/setup.sh --dev installs them); skipped, with the
reason, where they are missing or the container does not boot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from nodes import free_ports, wait_for

from exo.models.cards import CARDS, DEFAULT_MODEL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROOTFS = Path(os.environ.get("EXO_TEST_ROOTFS", Path.home() / ".cache/exo-test-rootfs/bookworm"))
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps"
PIP_FILES = ("/etc/pip.conf", "/etc/ssl/certs/ca-certificates.crt")  # the host's index and its certificates


def rootfs() -> Path:
    """A minimal Debian with systemd, built once by debootstrap and kept for later runs."""
    if (ROOTFS / "usr/lib/systemd/systemd").exists():
        return ROOTFS
    partial = ROOTFS.with_name(ROOTFS.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", partial,
                            "http://deb.debian.org/debian"], capture_output=True, text=True, timeout=1200)
    if built.returncode != 0:
        pytest.skip(f"debootstrap could not build the root file system: {built.stderr.strip()[-300:]}")
    partial.rename(ROOTFS)
    return ROOTFS


@dataclass
class Container:
    nspawn: subprocess.Popen[bytes]
    leader: int  # the container's PID 1: its systemd
    root: Path  # its file system, seen from the host
    log: Path

    def sh(self, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`bash -c script` inside the container, as root, with the host's PIP_* settings."""
        pip_env = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("PIP_")]
        env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8", *pip_env]
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", "env", "-i", *env, "bash", "-c", script],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def ok(self, script: str, timeout: float = 600) -> str:
        result = self.sh(script, timeout)
        assert result.returncode == 0, f"$ {script}\n{result.stdout[-4000:]}"
        return result.stdout


def boot(tmp_path: Path) -> Container:
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (deployment/setup.sh --dev installs it)")
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    # A throw-away copy, removed with the container (nspawn's --ephemeral copy outlived a failed boot).
    base = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", "--reflink=auto", rootfs(), base], check=True, timeout=600)
    binds = [f"--bind-ro={REPO}:/src", f"--bind-ro={tmp_path / 'dist'}:/dist"]
    binds += [f"--bind-ro={path}" for path in (os.environ.get("PIP_FIND_LINKS", ""),) if path and Path(path).is_dir()]
    log = tmp_path / "nspawn.log"
    with log.open("wb") as out:
        nspawn = subprocess.Popen(["systemd-nspawn", "-q", "-b", "-D", base, "--register=no",
                                   "--keep-unit", "--resolv-conf=copy-host", "-M", f"exo-{uuid.uuid4().hex[:8]}",
                                   *binds], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: nspawn.poll() is not None or bool(container_init(nspawn)), 120, "the container's systemd")
        if nspawn.poll() is not None:
            pytest.skip(f"systemd-nspawn could not boot a container here: {log.read_text()[-500:]}")
        leader = container_init(nspawn)
        container = Container(nspawn, leader, Path(f"/proc/{leader}/root"), log)
        states: list[str] = []  # until its bus is up, systemctl cannot connect
        wait_for(lambda: states.append(container.sh("systemctl is-system-running --wait", timeout=120).stdout.strip())
                 or "bus" not in states[-1], 60, "the container's systemd to answer")
        state = states[-1]
        if state not in ("running", "degraded"):
            raise AssertionError(f"the container's systemd is {state}: {log.read_text()[-2000:]}")
        for path in PIP_FILES:
            if Path(path).is_file():
                shutil.copy(path, container.root / path.lstrip("/"))
        return container
    except BaseException:
        power_off_nspawn(nspawn)
        shutil.rmtree(base, ignore_errors=True)
        raise


def container_init(nspawn: subprocess.Popen[bytes]) -> int:
    """The pid of the container's PID 1 (nspawn's child once it has exec'd systemd), or 0."""
    try:
        return next((p.pid for p in psutil.Process(nspawn.pid).children() if p.name() == "systemd"), 0)
    except psutil.Error:
        return 0


def power_off_nspawn(nspawn: subprocess.Popen[bytes]) -> None:
    nspawn.terminate()  # nspawn asks the container's systemd to power off
    try:
        nspawn.wait(60)
    except subprocess.TimeoutExpired:
        nspawn.kill()
        nspawn.wait()


@pytest.fixture
def container(tmp_path: Path, wheel: Path) -> Iterator[Container]:
    (tmp_path / "dist").mkdir()
    shutil.copy(wheel, tmp_path / "dist")
    container = boot(tmp_path)
    try:
        yield container
    finally:
        power_off_nspawn(container.nspawn)
        shutil.rmtree(tmp_path / "rootfs", ignore_errors=True)


def stream_chat(url: str, max_tokens: int) -> Iterator[str]:
    body = {"model": DEFAULT_MODEL, "stream": True, "max_tokens": max_tokens,
            "temperature": 0,  # greedy: this prompt runs to hundreds of tokens, so a stop lands mid-stream
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        yield from (line for line in response.iter_lines() if line)


def test_the_documented_deployment_works_under_a_real_systemd(container: Container, wheel: Path,
                                                              models_dir: Path) -> None:
    deploy = "/src/deployment"
    whl = f"/dist/{wheel.name}"
    [port] = free_ports(1)  # the container shares the host's network: not 52415, which a node here may hold
    url = f"http://127.0.0.1:{port}"

    # Install, as docs/deployment.md says, then the settings an operator would write.
    container.ok(f"{deploy}/install.sh {whl}", timeout=1200)
    container.ok(f"cat >> /etc/exo/exo.env <<'EOF'\nEXO_API_HOST=127.0.0.1\nEXO_API_PORT={port}\n"
                 f"EXO_CLUSTER=test-{uuid.uuid4().hex[:8]}\nEXO_ARGS=--no-discovery\nEXO_SHUTDOWN_TIMEOUT=3\nEOF")
    # The model ahead of time (the docs' `exo models fetch`), here from the host's cache.
    card = CARDS[DEFAULT_MODEL]
    models = container.root / "var/lib/exo/models" / card.id
    models.mkdir(parents=True)
    shutil.copy(models_dir / card.id / card.filename, models / card.filename)
    container.ok("chown -R exo:exo /var/lib/exo/models")

    container.ok("systemctl start exo")
    container.ok(f"{deploy}/validate-deployment.sh --wait 180", timeout=300)
    # The exposure score docs/deployment.md gives is the one a running systemd reports.
    score = re.search(r"Overall exposure level for exo.service: ([\d.]+)", container.ok("systemd-analyze security exo"))
    assert score and f"scores it {score[1]}" in (REPO / "docs/deployment.md").read_text(), score

    # A chat.
    events = list(stream_chat(url, 16))
    assert events[-1] == "data: [DONE]"

    # Stop idle: exit 0, no runner left, no traceback.
    assert_clean_stop(container, lambda: None)

    # Stop with a stream in flight: the stream ends with an error event and [DONE].
    container.ok("systemctl start exo")
    container.ok(f"{deploy}/validate-deployment.sh --wait 180", timeout=300)
    cut: list[str] = []

    def stop_mid_stream() -> None:
        for event in stream_chat(url, 4000):
            cut.append(event)
            if len(cut) == 4:
                container.sh("systemctl stop --no-block exo")

    assert_clean_stop(container, stop_mid_stream)
    assert cut[-1] == "data: [DONE]" and '"error"' in cut[-2], cut[-3:]

    # SIGKILL to every process of the unit: systemd restarts it, and no runner is left over.
    container.ok("systemctl start exo")
    container.ok(f"{deploy}/validate-deployment.sh --wait 180", timeout=300)
    before = container.ok("systemctl show -p MainPID --value exo").strip()
    container.ok("systemctl kill -s SIGKILL exo")
    wait_for(lambda: container.sh("systemctl show -p MainPID --value exo").stdout.strip() not in ("0", before), 60,
             "systemd to restart the node")
    container.ok(f"{deploy}/validate-deployment.sh --wait 180", timeout=300)

    # Deploy (the same wheel: pip has nothing to change, the restart and validation are what is tested),
    # with a stream in flight; then roll back to the backup it made, and validate.
    streamed = stream_chat(url, 200)
    next(streamed)
    deployed = container.sh(f"{deploy}/deploy.sh {whl}", timeout=600)
    rest = list(streamed)
    assert deployed.returncode == 0, deployed.stdout[-4000:]
    assert rest[-1] == "data: [DONE]"
    assert "20" in container.ok(f"{deploy}/rollback.sh --list")
    container.ok(f"{deploy}/rollback.sh latest", timeout=600)
    container.ok(f"{deploy}/validate-deployment.sh")
    assert container.ok("stat -c %a /var/backups/exo").strip() == "700"


def assert_clean_stop(container: Container, during: Callable[[], None]) -> None:
    """`systemctl stop exo` (or `during`, which stops it mid-stream) ends with the node's own exit 0,
    no runner left in the unit's cgroup, and no traceback in that run's journal."""
    invocation = container.ok("systemctl show -p InvocationID --value exo").strip()
    during()
    container.ok("systemctl stop exo")
    show = container.ok("systemctl show -p Result -p ExecMainStatus -p ExecMainCode exo")
    assert "Result=success" in show and "ExecMainStatus=0" in show, show
    assert container.sh("pgrep -f exo.worker.runner").returncode == 1  # none left
    journal = container.ok(f"journalctl _SYSTEMD_INVOCATION_ID={invocation} --no-pager -o cat")
    assert "Traceback" not in journal and "stopped" in journal, journal[-3000:]
