"""The dashboard in a real headless Chromium, against a real 2-node cluster on loopback.

The page is opened on the node that is not the master, before any model is placed; the model is then
placed across both nodes and the page must show it without a reload. A chat message typed into the page
must stream its answer in piece by piece, the same answer the API gives. A node started with an API key
makes the page ask for the key once and keep it. On two nodes that each offer less memory than the model
needs, the page shows the planner's one preview, places the model on both from it, shows both ranks
loading to Ready, and deletes it. Screenshots go to the test's tmp_path, and also to
$EXO_TEST_ARTIFACTS when that is set (CI keeps them).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from nodes import RunningNode, answers, node_pair, running_nodes, static_peers, wait_for
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from exo import local_cluster
from exo.master.planner import DEFAULT_CONTEXT
from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
QUESTION = "What is the capital of France?"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[list[RunningNode]]:
    root = tmp_path_factory.mktemp("dashboard")
    with node_pair([root / "node0", root / "node1"], models_dir, "--no-preload") as nodes:
        yield nodes


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Debian Chromium driven by its chromedriver; both processes are gone after the test."""
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("Debian's chromium and chromium-driver are not installed (deployment/setup.sh --dev installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1440,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    processes = [psutil.Process(service.process.pid), *psutil.Process(service.process.pid).children(recursive=True)]
    try:
        yield driver
    finally:
        driver.quit()
        _, alive = psutil.wait_procs(processes, timeout=10)
        for process in alive:
            process.kill()
        assert not alive, f"chromium or chromedriver outlived driver.quit(): {[p.pid for p in alive]}"


@pytest.fixture
def screenshot(tmp_path: Path, browser: WebDriver) -> Callable[[str], Path]:
    """Saves the page as `name`.png in tmp_path, copied to $EXO_TEST_ARTIFACTS when set."""
    keep = os.environ.get("EXO_TEST_ARTIFACTS")

    def save(name: str) -> Path:
        path = tmp_path / f"{name}.png"
        assert browser.save_screenshot(str(path)), f"no screenshot {name}"
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        return path

    return save


def text_of(driver: WebDriver, css: str) -> str:
    """The rendered text of every element `css` matches, read in one script: the page redraws each state
    it polls, so elements found by one WebDriver call can be gone by the next (a stale element)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText).join('\\n')", css)


def api_answer(node: RunningNode) -> str:
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "max_tokens": MAX_TOKENS, "temperature": 0}
    response = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)
    chunks = [json.loads(e.removeprefix("data: ")) for e in response.text.split("\n\n") if e and "[DONE]" not in e]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


# Records every length the answer's text takes in the page, to tell a streamed answer from one set at once.
WATCH_ANSWER = """
window.answerLengths = [];
new MutationObserver(() => {
  const bubble = [...document.querySelectorAll('.msg.assistant .bubble')].pop();
  const n = bubble ? bubble.textContent.length : 0;
  if (n && n !== window.answerLengths.at(-1)) window.answerLengths.push(n);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def test_the_dashboard_shows_the_cluster_live_and_streams_a_chat_answer(
        cluster: list[RunningNode], browser: WebDriver, screenshot: Callable[[str], Path]) -> None:
    state = cluster[0].state()
    master_id = state["masterId"]
    node_ids = [n.state()["nodeId"] for n in cluster]
    [follower] = [n for node_id, n in zip(node_ids, cluster, strict=True) if node_id != master_id]
    wait = WebDriverWait(browser, 30, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))

    browser.get(follower.url)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".node-card")) == 2)
    for node_id, node in zip(node_ids, cluster, strict=True):
        card = browser.find_element(By.CSS_SELECTOR, f'.node-card[data-node-id="{node_id}"]')
        assert node_id[:8] in card.text and state["nodes"][node_id]["hostname"] in card.text
        assert f"127.0.0.1:{node.port}" in card.text
        assert ("master" in card.get_attribute("class").split()) == (node_id == master_id)
        assert ("★ master" in card.text) == (node_id == master_id)
    assert "this node" in browser.find_element(By.CSS_SELECTOR, ".node-card:not(.master)").text
    assert "No model placed" in text_of(browser, "#instances")
    assert browser.find_element(By.ID, "live").text == "live"

    # placed while the page is open: it must show up without a reload
    instance_id = local_cluster.place(cluster, cluster, DEFAULT_MODEL, [(0, 15), (15, 30)], timeout=90)
    shards = f'.instance[data-instance-id="{instance_id}"] .shard'
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, shards)) == 2
               and text_of(d, f'.instance[data-instance-id="{instance_id}"] .runners').count("Ready") == 2)
    drawn = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => [e.dataset.nodeId, e.innerText])", shards)
    for rank, (node_id, text) in enumerate(drawn):  # in layer order
        assert node_id == node_ids[rank]
        assert text.endswith(["0–15", "15–30"][rank])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#topology svg path.ring")) == 2  # the ring, both ways
    assert f"context {DEFAULT_CONTEXT}" in text_of(browser, f'.instance[data-instance-id="{instance_id}"] header')
    screenshot("cluster")

    # a chat through the page: greedy and short, so it can be compared with the API's own answer
    for field, value in (("max-tokens", MAX_TOKENS), ("temperature", 0)):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(str(value))
    browser.execute_script(WATCH_ANSWER)
    browser.find_element(By.ID, "prompt").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming"))
    WebDriverWait(browser, 60, poll_frequency=0.1).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming"))
    answer = browser.execute_script("return document.querySelector('.msg.assistant .bubble').textContent")
    lengths = browser.execute_script("return window.answerLengths")
    assert answer.strip() and "Paris" in answer
    assert len(lengths) >= 2 and lengths == sorted(lengths), f"the answer did not stream in: {lengths}"
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error, .msg-error")
    assert answer == api_answer(follower)
    stats = text_of(browser, ".msg.assistant .msg-stats")
    assert "tok/s" in stats and "first after" in stats, stats
    assert float(browser.find_element(By.ID, "tps").text) > 0
    screenshot("chat")

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_the_dashboard_asks_for_the_api_key_once_and_keeps_it(
        tmp_path: Path, models_dir: Path, browser: WebDriver, screenshot: Callable[[str], Path]) -> None:
    key = "dashboard-test-key"
    with running_nodes([tmp_path / "node"], models_dir, "--no-discovery", "--no-preload", "--api-key", key) as [node]:
        wait_for(lambda: answers(node), 30, "the node answers")
        wait = WebDriverWait(browser, 20, poll_frequency=0.1)
        browser.get(node.url)
        wait.until(lambda d: d.find_element(By.ID, "auth").is_displayed())
        assert browser.find_element(By.ID, "live").text == "locked"
        assert "API key" in browser.find_element(By.ID, "auth").text
        assert not browser.find_elements(By.CSS_SELECTOR, ".node-card")
        screenshot("api-key")

        browser.find_element(By.ID, "auth-key").send_keys(key + "\n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".node-card")) == 1)
        assert not browser.find_element(By.ID, "auth").is_displayed()
        assert browser.execute_script("return localStorage.getItem('exo.apiKey')") == key

        browser.refresh()  # the stored key is sent from the first request on
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".node-card")) == 1)
        assert not browser.find_element(By.ID, "auth").is_displayed()
        assert browser.find_element(By.ID, "live").text == "live"
        # read while the node runs (once it stops, the page's polls fail); the first requests were refused:
        # those 401s are expected, nothing else is
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
        assert not errors, errors


@pytest.fixture(scope="module")
def capped_cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[list[RunningNode]]:
    """Two nodes that offer 220 MB each, 64 MB of it past the planner's headroom: the default model's 98 MB
    file, held as stored, and its caches for 128 positions (12 MB with the prefix cache's) need both."""
    root = tmp_path_factory.mktemp("dashboard-place")
    with running_nodes([root / "node0", root / "node1"], models_dir, "--no-preload", "--max-memory", "220MB",
                       "--context", "128",
                       per_node=static_peers) as nodes:
        wait_for(lambda: all(answers(n) for n in nodes), 30, "the nodes answer")
        wait_for(lambda: all(len(n.state()["nodes"]) == 2 and n.state()["masterId"] for n in nodes), 30,
                 "both nodes agree on a master")
        yield nodes


# Each element matching a selector: its data-node-id, then (a table row's) its cells' text, read at once.
READ_ROWS = """return [...document.querySelectorAll(arguments[0])]
  .map(r => [r.dataset.nodeId, ...[...(r.cells ?? [])].map(c => c.textContent)])"""

# Records every status each runner chip of the page shows, to tell runners seen loading from ones shown Ready at once.
WATCH_RUNNERS = """
window.runnerStatuses = {};
new MutationObserver(() => {
  for (const chip of document.querySelectorAll('#instances .runners [data-runner-id]')) {
    const seen = (window.runnerStatuses[chip.dataset.runnerId] ??= []);
    const status = chip.querySelector('strong')?.textContent;
    if (status && status !== seen.at(-1)) seen.push(status);
  }
}).observe(document.getElementById('instances'), {childList: true, subtree: true, characterData: true});
"""


def test_the_dashboard_places_the_model_on_two_nodes_from_the_planners_preview_and_deletes_it(
        capped_cluster: list[RunningNode], browser: WebDriver, screenshot: Callable[[str], Path]) -> None:
    node_ids = [n.state()["nodeId"] for n in capped_cluster]
    expected = httpx.get(f"{capped_cluster[0].url}/instance/previews", params={"model_id": DEFAULT_MODEL}).json()
    [two] = expected["previews"]  # 500 MB a node: only both hold it
    redrawn = (StaleElementReferenceException,)  # the page redraws every state it polls
    wait = WebDriverWait(browser, 30, poll_frequency=0.1, ignored_exceptions=redrawn)

    browser.get(capped_cluster[1].url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#place-model option[value="{DEFAULT_MODEL}"]'))
    Select(browser.find_element(By.ID, "place-model")).select_by_value(DEFAULT_MODEL)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.preview[data-nodes="2"] tbody tr'))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".preview")) == 1
    rows = browser.execute_script(READ_ROWS, '.preview[data-nodes="2"] tbody tr')  # at once: the page redraws
    assert [node_id for node_id, *_ in rows] == [s["nodeId"] for s in two["shards"]]
    assert sorted(s["nodeId"] for s in two["shards"]) == sorted(node_ids)
    for (_, rank, _, layers, memory), shard in zip(rows, two["shards"], strict=True):
        assert rank == str(shard["rank"]) and layers == f"{shard['start']}–{shard['end']} of 30"
        assert memory.endswith("MiB") and shard["memoryBytes"] > 0
    screenshot("place-preview")

    browser.execute_script(WATCH_RUNNERS)
    browser.find_element(By.CSS_SELECTOR, '.preview button[data-place="2"]').click()
    wait.until(lambda d: capped_cluster[0].state()["instances"])
    [instance_id] = capped_cluster[0].state()["instances"]
    card = f'.instance[data-instance-id="{instance_id}"]'
    WebDriverWait(browser, 120, poll_frequency=0.1, ignored_exceptions=redrawn).until(
        lambda d: text_of(d, f"{card} .runners").count("Ready") == 2)
    assert instance_id in browser.find_element(By.ID, "place-status").text
    for node in capped_cluster:  # both ranks Ready, as every node sees it
        runners = node.state()["runners"]
        assert [runners[f"{instance_id}.{rank}"]["status"] for rank in (0, 1)] == ["Ready", "Ready"]
    bar = browser.execute_script(READ_ROWS, f"{card} .shard")
    assert [node_id for node_id, *_ in bar] == [s["nodeId"] for s in two["shards"]]
    seen = browser.execute_script("return window.runnerStatuses")
    assert sorted(seen) == [f"{instance_id}.0", f"{instance_id}.1"]
    assert all(statuses[-1] == "Ready" for statuses in seen.values()), seen
    assert any(len(statuses) > 1 for statuses in seen.values()), f"no runner was seen loading: {seen}"
    screenshot("placed")

    browser.find_element(By.CSS_SELECTOR, f'{card} button[data-delete="{instance_id}"]').click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, card) and "No model placed" in text_of(d, "#instances"))
    wait_for(lambda: not any(n.state()["instances"] or n.state()["runners"] for n in capped_cluster), 30,
             "every node to drop the instance and its runners")
    assert browser.find_element(By.ID, "place-status").text == f"Deleted {instance_id}."
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
