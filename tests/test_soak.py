import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from exo.soak import Outcome, SoakReport, StreamTally, completion_result, error_reason, message_prefix


def stream(*lines: str) -> tuple[Outcome, str | None]:
    tally = StreamTally()
    for line in lines:
        tally.feed(line)
    return tally.verdict()


CHUNK = 'data: {"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}'
FINISH = 'data: {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}'
ERROR = 'data: {"error": {"message": "Runner a1b2c3d4e5f6.0 stopped during the request; retry shortly.", "code": "x"}}'


@pytest.mark.parametrize(("lines", "verdict"), [
    ((CHUNK, "", FINISH, "data: [DONE]"), (Outcome.SERVED, None)),
    ((CHUNK, ERROR, "data: [DONE]"), (Outcome.FAILED, "stream error: Runner <id> stopped during the request;")),
    ((CHUNK, FINISH), (Outcome.LOST, "stream cut without [DONE]")),
    ((CHUNK, ERROR), (Outcome.LOST, "stream cut without [DONE] after an error event")),
    ((CHUNK, "data: [DONE]"), (Outcome.LOST, "[DONE] without a finish_reason or an error")),
    ((CHUNK, "data: {not json", FINISH, "data: [DONE]"), (Outcome.LOST, "malformed stream chunk")),
])
def test_a_stream_is_served_only_when_it_finishes_and_ends_with_done(lines: tuple[str, ...],
                                                                      verdict: tuple[Outcome, str | None]) -> None:
    assert stream(*lines) == verdict


def test_only_errors_with_openais_body_count_as_clean_failures() -> None:
    body = json.dumps({"error": {"message": "Instance 34e18182fd36 has 16 requests waiting, its limit; retry."}})
    assert error_reason(503, body) == "503 Instance <id> has N requests waiting, its limit;"
    assert error_reason(502, "<html>Bad Gateway</html>") is None
    assert error_reason(500, json.dumps({"detail": "boom"})) is None
    assert error_reason(500, json.dumps(["error"])) is None


def test_a_completion_is_served_only_with_a_finish_reason() -> None:
    good = {"choices": [{"message": {"content": "Hi"}, "finish_reason": "length"}], "usage": {"completion_tokens": 4}}
    assert completion_result(json.dumps(good)) == (Outcome.SERVED, None, 4)
    unfinished = {"choices": [{"message": {"content": "Hi"}, "finish_reason": None}], "usage": {}}
    assert completion_result(json.dumps(unfinished))[0] == Outcome.LOST
    assert completion_result("{}")[0] == Outcome.LOST


def test_error_messages_that_differ_only_in_ids_and_numbers_count_together() -> None:
    a = message_prefix("No instance of m became ready within 120s; GET /state shows its runners.")
    b = message_prefix("No instance of m became ready within 90s; GET /state shows its runners.")
    assert a == b == "No instance of m became ready within N;"
    assert message_prefix("The smollm2-135m-instruct instance is gone. Retry.") == \
        "The smollm2-135m-instruct instance is gone."


@pytest.mark.slow
def test_a_short_soak_with_a_restart_loses_nothing_and_leaves_no_process(models_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "EXO_MODELS_DIR": str(models_dir)}  # its nodes' homes go there
    done = subprocess.run(
        [sys.executable, "-m", "exo.main", "soak", "--nodes", "2", "--duration", "25", "--restart-every", "15",
         "--concurrency", "3", "--max-tokens", "12", "--max-prompt-tokens", "32", "--seed", "7", "--split", "--json"],
        env=env, capture_output=True, text=True, timeout=150)

    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = SoakReport.model_validate_json(done.stdout)
    assert report.lost == 0 and report.served > 0, report
    assert report.requests == report.served + report.failed + report.cancelled + report.lost
    assert report.restarts == 1 and len(report.restart_s) == 1 and report.orphans == [] and report.exit_codes == [0, 0]
    assert report.latency_p50_s and report.latency_p95_s and report.tokens_per_s > 0
    assert [m.node for m in report.memory] == [0, 1] and all(m.peak_runners_mb > 0 for m in report.memory)
    assert report.ok and not report.problems and not report.log_markers
    assert not [p.pid for p in psutil.process_iter(["environ"])
                if str(tmp_path) in (p.info["environ"] or {}).get("EXO_HOME", "")]
    assert not list(tmp_path.glob("exo-soak-*")), "the nodes' homes were not removed"
