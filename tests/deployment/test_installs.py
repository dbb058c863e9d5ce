"""Every way to install exo gives a node that starts and serves its dashboard and a chat: a built wheel,
a plain (not editable) `pip install` of a checkout, and deployment/setup.sh. install.sh and deploy.sh
install the same wheel for real in test_deploy_scripts.py. Each install is a fresh venv, its node run
without PYTHONPATH, so it imports the installed exo and nothing from this checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from nodes import RunningNode, free_ports, stop_node, wait_for
from releases import REPO, install_env, source_copy, venv_with_dependencies

pytestmark = pytest.mark.slow


def start_installed_node(exo: Path, home: Path, models_dir: Path) -> RunningNode:
    [port] = free_ports(1)
    home.mkdir(parents=True, exist_ok=True)
    env = install_env(EXO_HOME=str(home), EXO_MODELS_DIR=str(models_dir))
    with (home / "node.log").open("ab") as log:
        process = subprocess.Popen([exo, "--api-host", "127.0.0.1", "--api-port", str(port), "--no-discovery"],
                                   env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return RunningNode(process, port, home)


def assert_serves_dashboard_and_chat(venv: Path, home: Path, models_dir: Path) -> None:
    where = subprocess.run([venv / "bin/python", "-c", "import exo; print(exo.__file__)"], env=install_env(),
                           cwd=home.parent, capture_output=True, text=True, check=True).stdout
    assert REPO not in Path(where.strip()).parents, where  # the installed exo, not this checkout's
    node = start_installed_node(venv / "bin/exo", home, models_dir)
    try:
        wait_for(lambda: node.process.poll() is not None or _ready(node), 180, "the installed node's runner")
        assert node.process.poll() is None, node.log_tail()
        page = httpx.get(node.url + "/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(node.url + "/dashboard/app.js", timeout=10).status_code == 200
        chat = httpx.post(node.url + "/v1/chat/completions", timeout=120, json={
            "model": httpx.get(node.url + "/v1/models").json()["data"][0]["id"],
            "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"], chat.text
    finally:
        assert stop_node(node) == 0, node.log_tail()
    assert "Traceback" not in node.log.read_text()


def _ready(node: RunningNode) -> bool:
    try:
        return httpx.get(node.url + "/health", timeout=2).json().get("runners_ready") == 1
    except (httpx.HTTPError, ValueError):
        return False


def test_a_built_wheel_installs_a_node_that_serves_the_dashboard(wheel: Path, dependencies: Path, tmp_path: Path,
                                                                models_dir: Path) -> None:
    venv = venv_with_dependencies(tmp_path / "venv", dependencies)
    subprocess.run([venv / "bin/python", "-m", "pip", "install", "--quiet", wheel], env=install_env(), check=True,
                   timeout=300)
    assert (next(venv.glob("lib/python*/site-packages/exo/dashboard")) / "index.html").is_file()
    assert_serves_dashboard_and_chat(venv, tmp_path / "home", models_dir)


def test_pip_install_of_a_checkout_is_not_editable_and_serves_the_dashboard(dependencies: Path, tmp_path: Path,
                                                                           models_dir: Path) -> None:
    source = source_copy(tmp_path / "source")
    venv = venv_with_dependencies(tmp_path / "venv", dependencies)
    subprocess.run([venv / "bin/python", "-m", "pip", "install", "--quiet", source], env=install_env(), check=True,
                   timeout=300)
    (source / "exo").rename(tmp_path / "source-exo-moved")  # the install must not need the checkout
    assert_serves_dashboard_and_chat(venv, tmp_path / "home", models_dir)


def test_setup_script_installs_a_node_that_serves_the_dashboard(dependencies: Path, tmp_path: Path,
                                                               models_dir: Path) -> None:
    """deployment/setup.sh in a copy of the checkout, its .venv made beforehand with the dependencies
    (setup.sh keeps a .venv it finds), so it installs exo (editable, as for development) without
    downloading them; the model comes from the shared cache."""
    source = source_copy(tmp_path / "source")
    venv = venv_with_dependencies(source / ".venv", dependencies)
    result = subprocess.run([source / "deployment/setup.sh"], env=install_env(EXO_MODELS_DIR=str(models_dir)),
                            cwd=source, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout
    assert "setup: done" in result.stdout
    assert_serves_dashboard_and_chat(venv, tmp_path / "home", models_dir)
