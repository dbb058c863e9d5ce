"""install.sh, deploy.sh, rollback.sh and validate-deployment.sh, run for real in a temporary root.

The stand-in for systemd is `systemctl` (fake_systemctl.py: no systemd runs this machine), and it
starts the installed unit's ExecStart for real: validation talks to a real exo node on loopback and
reads its log through a stand-in `journalctl`. install.sh installs exo's wheel with pip, for real, into
a venv that already holds exo's dependencies (releases.py), as a machine image would; deploy.sh does the
same. Releases that must differ (a broken one, one without `exo doctor`) are venvs copied into place
with `--from-dir`: the test venv's interpreter and packages behind symlinks, with a RELEASE file naming
them. The default path, pip into a new venv, is tested on a tiny wheel.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from nodes import answers, free_ports, start_node, stop_node, wait_for
from releases import install_env, venv_with_dependencies

DEPLOYMENT = Path(__file__).resolve().parents[2] / "deployment"
Run = subprocess.CompletedProcess[str]
FAKE_SYSTEMCTL = Path(__file__).with_name("fake_systemctl.py")


def make_release(path: Path, name: str, *, broken: bool = False, doctor: bool = True) -> Path:
    """A venv for /opt/exo/venv that runs this checkout's exo; `broken`: one whose exo dies at
    start with a traceback, as a release with a bad import would; not `doctor`: one whose exo has no
    `doctor` command, as releases before it."""
    venv = Path(sys.prefix)
    (path / "bin").mkdir(parents=True)
    (path / "pyvenv.cfg").write_text((venv / "pyvenv.cfg").read_text())
    (path / "lib").symlink_to(venv / "lib")
    (path / "bin" / "python").symlink_to(Path(sys.executable).resolve())  # pyvenv.cfg beside bin/ makes it a venv
    exo = ('echo "Traceback (most recent call last):" >&2; echo "ImportError: broken release" >&2; exit 1'
           if broken else 'exec "$(dirname "$0")/python" -m exo.main "$@"')
    if not doctor:
        exo = f'if [ "$1" = doctor ]; then echo "exo: invalid choice: doctor" >&2; exit 2; fi\n{exo}'
    (path / "bin" / "exo").write_text(f"#!/bin/sh\n{exo}\n")
    (path / "bin" / "exo").chmod(0o755)
    (path / "RELEASE").write_text(name)
    return path


def make_wheel(directory: Path, version: str) -> Path:
    """A wheel of a tiny distribution whose console script `exo` prints its version: what install.sh's
    default path (pip) needs, without building exo and its dependencies."""
    info = f"exo_standin-{version}.dist-info"
    files = {"exo_standin.py": f'def main():\n    print("exo stand-in {version}")\n',
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: exo-standin\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/entry_points.txt": "[console_scripts]\nexo = exo_standin:main\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = directory / f"exo_standin-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_install_by_default_creates_a_venv_and_pip_installs_into_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outputs = []
    for version in ("0.0.1", "0.0.2"):  # the second run upgrades in place
        result = subprocess.run([DEPLOYMENT / "install.sh", "--root", root, "--no-systemctl",
                                 make_wheel(tmp_path, version)], env={**os.environ, "PYTHON": sys.executable},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert result.returncode == 0, result.stdout
        assert f"installed exo stand-in {version}" in result.stdout
        outputs.append(result.stdout)
    assert "creating the virtual environment" in outputs[0]
    assert "creating the virtual environment" not in outputs[1]
    assert (root / "opt/exo/venv/pyvenv.cfg").is_file()


@dataclass
class Host:
    """A temporary root with exo installed, a fake systemctl on PATH and the node's settings."""

    root: Path
    env: dict[str, str]
    systemd: Path
    port: int

    def run(self, script: str, *args: str | Path, env: dict[str, str] | None = None) -> Run:
        """The script's exit status, with its stdout and stderr together (as a person would read them)."""
        return subprocess.run([DEPLOYMENT / script, *args], env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)

    def systemctl(self, *args: str) -> Run:
        return subprocess.run(["systemctl", *args], env=self.env, capture_output=True, text=True, timeout=90)

    @property
    def release(self) -> str:
        """The RELEASE of a `--from-dir` release; "wheel" for exo pip-installed from its wheel."""
        path = self.root / "opt/exo/venv/RELEASE"
        return path.read_text() if path.exists() else "wheel"

    @property
    def settings(self) -> Path:
        return self.root / "etc/exo/exo.env"

    @property
    def log(self) -> Path:
        """The log of the unit's current run."""
        return self.systemd / "journal" / f"{(self.systemd / 'exo.invocation').read_text()}.log"

    def calls(self) -> list[str]:
        return (self.systemd / "calls").read_text().splitlines()

    def backups(self) -> list[Path]:
        return sorted((self.root / "var/backups/exo").glob("[0-9]*"))

    def node(self) -> psutil.Process | None:
        try:
            return psutil.Process(int((self.systemd / "exo.pid").read_text()))
        except (FileNotFoundError, psutil.Error):
            return None


def make_host(tmp_path: Path, wheel: Path, dependencies: Path, settings: str) -> Host:
    """exo's wheel installed by install.sh under tmp_path/root, with `settings` added to its settings file."""
    bin_dir, systemd = tmp_path / "bin", tmp_path / "systemd"
    bin_dir.mkdir()
    systemd.mkdir()
    for name, env in (("systemctl", ""), ("journalctl", "FAKE_SYSTEMCTL_AS=journalctl ")):
        (bin_dir / name).write_text(f'#!/bin/sh\n{env}exec "{sys.executable}" "{FAKE_SYSTEMCTL}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    root = tmp_path / "root"
    env = install_env(PATH=f"{bin_dir}:{os.environ['PATH']}", EXO_ROOT=str(root), FAKE_SYSTEMCTL_DIR=str(systemd),
                      FAKE_SYSTEMCTL_UNITS=str(root / "etc/systemd/system"), EXO_VALIDATE_WAIT="30")
    env.pop("EXO_LOG_COMMAND", None)
    [port] = free_ports(1)
    host = Host(root, env, systemd, port)
    venv_with_dependencies(root / "opt/exo/venv", dependencies)  # the image's venv, dependencies installed
    installed = host.run("install.sh", wheel)
    assert installed.returncode == 0, installed.stdout
    with host.settings.open("a") as file:
        file.write(f"EXO_API_HOST=127.0.0.1\nEXO_API_PORT={port}\n{settings}")
    return host


def stop_host(host: Host) -> None:
    node = host.node()
    host.systemctl("stop", "exo")
    assert node is None or not node.is_running() or node.status() == psutil.STATUS_ZOMBIE


@pytest.fixture
def host(tmp_path: Path, wheel: Path, dependencies: Path) -> Iterator[Host]:
    host = make_host(tmp_path, wheel, dependencies, "EXO_ARGS=--no-preload --no-discovery\n")
    try:
        yield host
    finally:
        stop_host(host)


def test_install_creates_dirs_settings_and_unit_then_enables_it(host: Host) -> None:
    root = host.root
    for path in ("opt/exo/venv/bin/exo", "etc/exo/exo.env", "etc/systemd/system/exo.service"):
        assert (root / path).is_file(), path
    assert (root / "var/lib/exo").is_dir() and (root / "var/backups/exo").is_dir()
    assert host.calls() == ["daemon-reload", "enable exo"]
    assert f"EXO_HOME={root}/var/lib/exo" in (root / "etc/systemd/system/exo.service").read_text()
    assert (root / "etc/exo/exo.env").stat().st_mode & 0o777 == 0o640
    assert (root / "var/backups/exo").stat().st_mode & 0o777 == 0o700

    # again: an upgrade in place that keeps the settings a person wrote
    again = host.run("install.sh", "--from-dir", make_release(root.parent / "v1b", "v1b"))
    assert again.returncode == 0, again.stdout
    assert "keeping the settings" in again.stdout and f"EXO_API_PORT={host.port}" in host.settings.read_text()
    assert host.release == "v1b"


def test_deploy_backs_up_installs_and_validates_and_rollback_restores_the_backup(host: Host, tmp_path: Path) -> None:
    assert host.systemctl("start", "exo").returncode == 0
    assert host.run("validate-deployment.sh", "--wait", "30").returncode == 0
    old_settings, old_node = host.settings.read_text(), host.node()
    new_settings = tmp_path / "new.env"
    new_settings.write_text(old_settings + "EXO_CLUSTER=blue\n")

    deployed = host.run("deploy.sh", "--from-dir", make_release(tmp_path / "v2", "v2"), "--env", new_settings)

    assert deployed.returncode == 0, deployed.stdout
    assert host.release == "v2" and "EXO_CLUSTER=blue" in host.settings.read_text()
    assert "restart exo" in host.calls() and host.node() and host.node() != old_node
    [backup] = host.backups()
    assert re.fullmatch(r"\d{8}-\d{6}", backup.name), backup.name
    assert backup.stat().st_mode & 0o777 == 0o700 and backup.parent.stat().st_mode & 0o777 == 0o700
    assert list(backup.glob("opt-exo/venv/lib/python*/site-packages/exo/dashboard/index.html"))  # the wheel's
    assert (backup / "etc-exo/exo.env").read_text() == old_settings
    assert (backup / "exo.service").read_text() == (host.root / "etc/systemd/system/exo.service").read_text()
    assert "version=exo 0.1.0" in (backup / "manifest").read_text()
    assert backup.name in host.run("rollback.sh", "--list").stdout

    rolled_back = host.run("rollback.sh", backup.name)

    assert rolled_back.returncode == 0, rolled_back.stdout
    assert host.release == "wheel" and host.settings.read_text() == old_settings
    assert "deployment is healthy" in rolled_back.stdout
    assert host.run("rollback.sh", "19990101-000000").returncode == 2


def test_deploy_of_a_release_that_fails_validation_rolls_back_by_itself(host: Host, tmp_path: Path) -> None:
    assert host.systemctl("start", "exo").returncode == 0

    deployed = host.run("deploy.sh", "--from-dir", make_release(tmp_path / "bad", "bad", broken=True))

    assert deployed.returncode == 3, deployed.stdout
    assert "FAIL" in deployed.stdout and "Traceback" in deployed.stdout  # why, in the deploy's own output
    assert "rolling back" in deployed.stdout and "previous version is back and healthy" in deployed.stdout
    assert host.release == "wheel"
    assert host.systemctl("is-active", "exo").stdout.strip() == "active"
    [backup] = host.backups()  # kept: it is the way back should the restored version fail later
    assert list(backup.glob("opt-exo/venv/lib/python*/site-packages/exo/dashboard/index.html"))  # the wheel's


def test_validate_passes_on_a_clean_log_and_fails_on_each_bad_line(host: Host, tmp_path: Path) -> None:
    assert host.systemctl("start", "exo").returncode == 0
    clean = host.run("validate-deployment.sh", "--wait", "30")
    assert clean.returncode == 0, clean.stdout
    assert "/health says ok" in clean.stdout and "/state answers, with a master" in clean.stdout
    assert "no tracebacks or race-condition errors" in clean.stdout

    for line in ["Traceback (most recent call last):", "anyio.ClosedResourceError", "RuntimeError: Queue is closed"]:
        log = tmp_path / "node.log"
        log.write_text(f"{host.log.read_text()}{line}\n")
        dirty = host.run("validate-deployment.sh", env={"EXO_LOG_FILE": str(log)})
        assert dirty.returncode == 1, dirty.stdout
        assert "1 check(s) failed" in dirty.stdout and line in dirty.stdout


def test_validate_fails_when_the_service_is_down(host: Host) -> None:
    result = host.run("validate-deployment.sh")
    assert result.returncode == 1
    assert "service exo is inactive" in result.stdout and "/health: " in result.stdout


@pytest.mark.parametrize("doctor", [True, False], ids=["exo doctor", "no exo doctor"])
def test_validate_finds_a_runner_whose_node_is_gone(host: Host, tmp_path: Path, doctor: bool) -> None:
    """A process that looks like a runner of this install (`VENV/bin/python -m exo.worker.runner
    SPEC NODE_PID`) whose node pid does not exist: a module of that name that only sleeps. Found by
    `exo doctor`, or without it (older releases) by validate's own look through /proc."""
    if not doctor:
        assert host.run("install.sh", "--from-dir", make_release(tmp_path / "old", "old", doctor=False)).returncode == 0
    assert host.systemctl("start", "exo").returncode == 0
    fake = tmp_path / "fake_runner"
    (fake / "exo/worker").mkdir(parents=True)
    (fake / "exo/__init__.py").write_text("")
    (fake / "exo/worker/__init__.py").write_text("")
    (fake / "exo/worker/runner.py").write_text("import time\ntime.sleep(60)\n")
    venv_python = host.root / "opt/exo/venv/bin/python"
    orphan = subprocess.Popen([venv_python, "-m", "exo.worker.runner", "{}", "99999999"], cwd=fake)
    try:
        result = host.run("validate-deployment.sh", "--wait", "30")
    finally:
        orphan.kill()
        orphan.wait()
    assert result.returncode == 1, result.stdout
    assert "1 check(s) failed" in result.stdout
    assert ("exo doctor finds issues" in result.stdout) == doctor
    assert (f"orphaned runners found: pids {orphan.pid}" in result.stdout) != doctor
    assert "orphaned runners" in result.stdout and str(orphan.pid) in result.stdout


def test_deploy_judges_the_new_version_by_its_own_log_lines(host: Host, tmp_path: Path) -> None:
    """A traceback the previous run logged (as it stopped, say) is not the new version's: deploy keeps it.
    Validating the whole unit's log (--since) still sees the old line."""
    assert host.systemctl("start", "exo").returncode == 0
    assert host.run("validate-deployment.sh", "--wait", "30").returncode == 0
    with host.log.open("a") as old_run:
        old_run.write("Traceback (most recent call last):\nRuntimeError: the old run's last words\n")

    deployed = host.run("deploy.sh", "--from-dir", make_release(tmp_path / "v2", "v2"))

    assert deployed.returncode == 0, deployed.stdout
    assert host.release == "v2" and "no tracebacks or race-condition errors in the log of the unit's current run" \
        in deployed.stdout
    whole = host.run("validate-deployment.sh", "--since", "-1h")
    assert whole.returncode == 1 and "the log since -1h has 1 bad line(s)" in whole.stdout, whole.stdout


def test_validate_fails_when_another_node_holds_the_port(host: Host, tmp_path: Path, models_dir: Path) -> None:
    """The unit crash-loops (its release is broken) while another exo answers on its port: /health says
    ok, but from a node that is not the unit's."""
    assert host.systemctl("start", "exo").returncode == 0  # the unit's node id is written at its first start
    assert host.run("validate-deployment.sh", "--wait", "30").returncode == 0
    assert host.run("install.sh", "--from-dir", make_release(tmp_path / "bad", "bad", broken=True)).returncode == 0
    host.systemctl("restart", "exo")
    other = start_node(tmp_path / "other", models_dir, "--no-preload", "--no-discovery", port=host.port)
    try:
        wait_for(lambda: answers(other), 30, "the other node to answer")
        result = host.run("validate-deployment.sh")
    finally:
        assert stop_node(other) == 0
    assert result.returncode == 1, result.stdout
    assert "/health says ok" in result.stdout  # what fooled the old check
    assert "another process answers" in result.stdout and "node_id is" in result.stdout


def test_validate_fails_until_the_runners_asked_for_are_ready(host: Host) -> None:
    assert host.systemctl("start", "exo").returncode == 0
    assert host.run("validate-deployment.sh", "--wait", "30").returncode == 0  # --no-preload: none asked for
    result = host.run("validate-deployment.sh", "--runners", "1")
    assert result.returncode == 1 and "0 runner(s) Ready of 1" in result.stdout, result.stdout


@pytest.mark.slow
def test_deploy_with_a_streamed_chat_in_flight_keeps_the_new_version(tmp_path: Path, wheel: Path,
                                                                     dependencies: Path, models_dir: Path) -> None:
    """The documented upgrade under load: a node serving the default model streams a chat while deploy.sh
    pip-installs the wheel, restarts and validates. The stream ends whole ([DONE]), the old run's stop
    does not count against the new one, and validation waits for the new node's runner to be Ready."""
    host = make_host(tmp_path, wheel, dependencies, f"EXO_ARGS=--no-discovery\nEXO_MODELS_DIR={models_dir}\n")
    try:
        assert host.systemctl("start", "exo").returncode == 0
        ready = host.run("validate-deployment.sh", "--wait", "120")
        assert ready.returncode == 0 and "runners Ready (at least 1)" in ready.stdout, ready.stdout
        url = f"http://127.0.0.1:{host.port}"
        body = {"model": httpx.get(url + "/v1/models").json()["data"][0]["id"], "stream": True, "max_tokens": 300,
                "messages": [{"role": "user", "content": "Tell a long story."}]}
        events: list[str] = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            events.append(next(lines))  # the stream has begun
            deploy = subprocess.Popen([DEPLOYMENT / "deploy.sh", wheel], env={**host.env, "EXO_VALIDATE_WAIT": "120"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            events.extend(lines)
        output, _ = deploy.communicate(timeout=300)
        assert deploy.returncode == 0, output
        assert "deployment is healthy" in output and "rolling back" not in output
        assert [e for e in events if e][-1] == "data: [DONE]", events[-3:]
        assert host.release == "wheel" and len(host.backups()) == 1
        assert host.calls().count("restart exo") == 1
    finally:
        stop_host(host)
