"""deployment/alerts.yml in Prometheus' own tool: `promtool check rules`, and a unit test per alert.

Each case feeds synthetic series (15 s apart, as long as its windows need: `ExoNodeDraining` waits
30 minutes) and says when the alert fires, with which labels and what it says. A series that must not
fire sits next to the one that must. tests/deployment/test_alerts_live.py runs the rules against real
nodes. Debian's `prometheus` package (deployment/setup.sh --dev installs it) brings promtool.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deployment" / "alerts.yml"
DOCS = "https://docs.example/exo"  # the `exo_docs` external label the rules build runbook_url from

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian's `prometheus` package has it; "
                                           "deployment/setup.sh --dev installs it)")


def rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


@dataclass(frozen=True)
class Case:
    alert: str
    series: dict[str, str]  # series selector -> promtool's expanding values ('0+1x10', '1x40', ...)
    at: str                 # when it fires
    labels: dict[str, str]  # the firing alert's labels, severity aside
    summary: str
    quiet_at: str | None = None  # a time before `at` when it must not fire yet
    more: dict[str, str] = field(default_factory=dict)  # other firing alerts' labels are not checked


CASES = [
    Case("ExoNodeDown", {'up{job="exo",instance="a:1"}': "1 1 0x10", 'up{job="exo",instance="b:1"}': "1x12"},
         "2m", {"job": "exo", "instance": "a:1"}, "exo node a:1 does not answer /metrics", quiet_at="1m"),
    Case("ExoNoMaster", {'exo_master_known{job="exo",instance="a:1"}': "1 0x10",
                         'exo_master_known{job="exo",instance="b:1"}': "1x11"},
         "2m", {"job": "exo", "instance": "a:1"}, "exo node a:1 has known no master for a minute", quiet_at="1m"),
    Case("ExoElectionChurn", {'exo_master_term{job="exo",instance="a:1"}': "1 2 3 4 5",
                              'exo_master_term{job="exo",instance="b:1"}': "1 1 2 2 3"},
         "1m", {"job": "exo", "instance": "a:1"}, "exo node a:1 changed master term 4 times in 10 minutes",
         quiet_at="45s"),
    Case("ExoTwoMasters", {'exo_is_master{job="exo",instance="a:1"}': "1x20",
                           'exo_is_master{job="exo",instance="b:1"}': "0 0 1x18"},
         "3m", {"job": "exo"}, "2 exo nodes have claimed to be master for 2 minutes", quiet_at="2m"),
    # c hears one of its two peers; a and b hear each other and c
    Case("ExoPeerMissing", {**{f'up{{job="exo",instance="{n}:1"}}': "1x12" for n in "abc"},
                            'exo_peers{job="exo",instance="a:1"}': "2x12",
                            'exo_peers{job="exo",instance="b:1"}': "2x12",
                            'exo_peers{job="exo",instance="c:1"}': "2 2 1x10"},
         "2m", {"job": "exo", "instance": "c:1"}, "exo node c:1 hears 2 of the cluster's nodes (itself included)",
         quiet_at="1m"),
    Case("ExoPeerDropped", {'exo_peers_dropped_total{job="exo",instance="a:1"}': "0 0 1x10",
                            'exo_peers_dropped_total{job="exo",instance="b:1"}': "0x12"},
         "1m", {"job": "exo", "instance": "a:1"}, "exo node a:1 dropped 1 silent peer(s) in 15 minutes",
         quiet_at="15s"),
    # every heartbeat of b arrives 2.4 s late: a sawtooth that is low at half the scrapes
    Case("ExoPeerHeartbeatLate", {'exo_peer_heartbeat_age_seconds{job="exo",instance="a:1",peer="b"}':
                                  " ".join(["0.3 2.4"] * 10),
                                  'exo_peer_heartbeat_age_seconds{job="exo",instance="a:1",peer="c"}':
                                  " ".join(["0.3 1.2"] * 10)},
         "4m", {"job": "exo", "instance": "a:1", "peer": "b"}, "exo node a:1 hears peer b late (up to 2.4s)",
         quiet_at="1m45s"),
    # a crash loop: each death is restarted at once and the restarts run out, again and again
    Case("ExoRunnerFailed", {'exo_runner_give_ups_total{job="exo",instance="a:1"}': "0 0 1 1 2x10",
                             'exo_runner_give_ups_total{job="exo",instance="b:1"}': "0x14",
                             'exo_runners{job="exo",instance="a:1",status="Failed"}': "0 1 0 1 0x10"},
         "1m", {"job": "exo", "instance": "a:1"}, "exo node a:1 gave up on 2 runner(s) in 15 minutes",
         quiet_at="15s"),
    Case("ExoRunnerRestarting", {'exo_runner_restarts_total{job="exo",instance="a:1"}': "0 1 2 3 4",
                                 'exo_runner_restarts_total{job="exo",instance="b:1"}': "0 0 0 0 0"},
         "1m", {"job": "exo", "instance": "a:1"}, "exo node a:1 restarted 4 runner(s) in 15 minutes", quiet_at="0m"),
    # a's runner stops at 15 s; b's makes progress every scrape, more slowly than the timeout
    Case("ExoGenerationStalled", {'exo_seconds_since_progress{job="exo",instance="a:1"}': "0 0+15x12",
                                  'exo_seconds_since_progress{job="exo",instance="b:1"}': "0 50 0 50 0 50 0 50 0 50",
                                  'exo_watchdog_timeout_seconds{job="exo",instance="a:1"}': "60x12",
                                  'exo_watchdog_timeout_seconds{job="exo",instance="b:1"}': "60x12"},
         "2m", {"job": "exo", "instance": "a:1"},
         "exo node a:1 has made no progress on its requests for 1m 45s", quiet_at="1m30s"),
    Case("ExoQueueSaturated", {'exo_queue_depth{job="exo",instance="a:1",model="m"}': "13x30",
                               'exo_queue_limit{job="exo",instance="a:1",model="m"}': "16x30",
                               'exo_queue_depth{job="exo",instance="a:1",model="n"}': "12x30",
                               'exo_queue_limit{job="exo",instance="a:1",model="n"}': "16x30"},
         "6m", {"job": "exo", "instance": "a:1", "model": "m"}, "the m queue on a:1 is 81.25% full", quiet_at="4m"),
    Case("ExoRequestsRejected", {
        'exo_requests_total{job="exo",instance="a:1",endpoint="/v1/chat/completions",model="m",code="200",'
        'forwarded="false"}': "0+9x40",
        'exo_requests_total{job="exo",instance="a:1",endpoint="/v1/chat/completions",model="m",code="503",'
        'forwarded="false"}': "0+1x40",
        'exo_requests_total{job="exo",instance="b:1",endpoint="/v1/chat/completions",model="m",code="200",'
        'forwarded="false"}': "0+9x40",
        'exo_requests_total{job="exo",instance="b:1",endpoint="/v1/chat/completions",model="m",code="503",'
        'forwarded="false"}': "0x40"},
         "6m", {"job": "exo", "instance": "a:1"}, "exo node a:1 answers 503 to 10% of chats", quiet_at="4m"),
    Case("ExoNodeDraining", {'exo_node_mode{job="exo",instance="a:1",mode="draining"}': "1x130",
                             'exo_node_mode{job="exo",instance="b:1",mode="draining"}': "1x20 0x110"},
         "31m", {"job": "exo", "instance": "a:1", "mode": "draining"},
         "exo node a:1 has been draining for 30 minutes: it answers 503 to new chats", quiet_at="29m"),
    # a tenth of the chats get a first token within 10 s, all within 30 s
    Case("ExoSlowFirstToken", {
        **{f'exo_time_to_first_token_seconds_bucket{{job="exo",instance="a:1",model="m",le="{le}"}}': values
           for le, values in (("5", "0x90"), ("10", "0+1x90"), ("30", "0+10x90"), ("+Inf", "0+10x90"))}},
         "21m", {"job": "exo", "instance": "a:1", "model": "m"},
         "95% of m chats on a:1 wait up to 28.89s for a first token", quiet_at="9m"),
    Case("ExoSlowGeneration", {
        **{f'exo_time_per_output_token_seconds_bucket{{job="exo",instance="a:1",model="m",le="{le}"}}': values
           for le, values in (("0.3", "0x90"), ("0.5", "0+1x90"), ("1", "0+10x90"), ("+Inf", "0+10x90"))}},
         "21m", {"job": "exo", "instance": "a:1", "model": "m"},
         "m on a:1 takes 972.2ms per token (p95)", quiet_at="9m"),
]


def promtool_tests() -> dict[str, Any]:
    described = rules()
    tests = []
    for case in CASES:
        rule = described[case.alert]
        description = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m, labels=case.labels: labels[m[1]],
                             rule["annotations"]["description"])
        annotations = {"summary": case.summary, "description": description,
                       "runbook_url": rule["annotations"]["runbook_url"].replace("{{ $externalLabels.exo_docs }}",
                                                                                 DOCS)}
        checks = [{"eval_time": case.at, "alertname": case.alert,
                   "exp_alerts": [{"exp_labels": {**case.labels, "severity": rule["labels"]["severity"]},
                                   "exp_annotations": annotations}]}]
        if case.quiet_at is not None:
            checks.append({"eval_time": case.quiet_at, "alertname": case.alert, "exp_alerts": []})
        tests.append({"interval": "15s", "external_labels": {"exo_docs": DOCS},
                      "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                      "alert_rule_test": checks})
    return {"rule_files": [str(ALERTS)], "evaluation_interval": "15s", "tests": tests}


def test_every_alert_has_a_promtool_case_and_a_runbook_anchor_in_the_docs() -> None:
    described = rules()
    assert sorted(c.alert for c in CASES) == sorted(described)
    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / "operations.md").read_text(), re.M)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}  # as GitHub makes them
    for name, rule in described.items():
        url = rule["annotations"]["runbook_url"]
        match = re.fullmatch(r"\{\{ \$externalLabels\.exo_docs \}\}/operations\.md#([a-z0-9-]+)", url)
        assert match and match[1] in anchors, (name, url)
        assert "runbook" not in rule["annotations"], name  # the old relative link, which no tool follows
        # a value is formatted: 1.0015812917594655 reads badly
        assert not re.search(r"\{\{ \$value \}\}", str(rule["annotations"])), name


@needs_promtool
def test_promtool_accepts_the_rules_and_each_alert_fires_for_its_failure_only(tmp_path: Path) -> None:
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump(promtool_tests(), sort_keys=False))
    run = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, check=False,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
