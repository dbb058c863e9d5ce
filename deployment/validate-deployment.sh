#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Is the exo service healthy? Each check is reported: the service is active, GET /health answers
# "status": "ok", GET /state answers with a master elected, the log since WHEN holds no traceback or
# race-condition error (Traceback, Queue is closed, ClosedResourceError), and `exo doctor` finds no
# issues, orphaned runners among them (an install without `exo doctor`: no runner outlived its node).
#
#   validate-deployment.sh [--root DIR] [--since WHEN] [--wait SECONDS] [--url URL]
#
#   --root DIR      the install lives under DIR (default: /; also EXO_ROOT)
#   --since WHEN    read the log from WHEN, a systemd time such as -10min or @1700000000 (default -10min)
#   --wait SECONDS  first wait up to this long for /health and a master (default 0); a bad log line
#                   ends the wait
#   --url URL       the node's API (default: from EXO_API_HOST and EXO_API_PORT in ROOT/etc/exo/exo.env)
#
# The log is EXO_LOG_FILE if set (the current run's log), else the output of EXO_LOG_COMMAND, else
# journalctl -u exo --since WHEN. EXO_API_KEY (or the settings file's) is sent to /state.
# Exit status: 0 all checks pass, 1 some failed, 2 bad usage.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

since=-10min
wait_s=0
url=${EXO_API_URL:-}
while [ $# -gt 0 ]; do
  case $1 in
    --root) EXO_ROOT=$(value "$@"); shift ;;
    --since) since=$(value "$@"); shift ;;
    --wait) wait_s=$(value "$@"); shift ;;
    --url) url=$(value "$@"); shift ;;
    -h | --help) usage && exit 0 ;;
    *) die 2 "unknown argument $1 (see --help)" ;;
  esac
  shift
done
set_paths
case $wait_s in '' | *[!0-9]*) die 2 "--wait takes whole seconds, not '$wait_s'" ;; esac

BAD_LOG='Traceback|Queue is closed|ClosedResourceError'

if [ -z "$url" ]; then
  host=$(env_value EXO_API_HOST 127.0.0.1)
  case $host in 0.0.0.0 | :: | "[::]") host=127.0.0.1 ;; *:*) host="[${host#[}" && host="${host%]}]" ;; esac
  url=http://$host:$(env_value EXO_API_PORT 52415)
fi
EXO_API_KEY=${EXO_API_KEY:-$(env_value EXO_API_KEY)}
export EXO_API_KEY

# http_check URL [KEY [VALUE]]: URL answers 200 with a JSON object (whose KEY is VALUE, or is set);
# else say why, on stderr.
http_check() {
  "$PYTHON" - "$@" <<'PY'
import json, os, sys, urllib.request
url, want = sys.argv[1], sys.argv[2:]
request = urllib.request.Request(url)
if key := os.environ.get("EXO_API_KEY"):
    request.add_header("Authorization", f"Bearer {key}")
try:  # no proxy: the node is local
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5) as answer:
        body = json.load(answer)
except Exception as e:  # refused, timed out, an error status, not JSON: all say the same here
    sys.exit(f"{url}: {e}")
if not isinstance(body, dict):
    sys.exit(f"{url}: answered {body!r}, not a JSON object")
if want:  # a key, or alternatives: "masterId|master_id" (/state before its camelCase)
    key = next((k for k in want[0].split("|") if k in body), want[0].split("|")[0])
    if body.get(key) != want[1] if len(want) > 1 else not body.get(key):
        sys.exit(f"{url}: {key} is {body.get(key)!r}" + (f", not {want[1]!r}" if len(want) > 1 else ""))
PY
}

recent_log() {
  if [ -n "${EXO_LOG_FILE:-}" ]; then
    tail -n "${EXO_LOG_LINES:-5000}" "$EXO_LOG_FILE"
  elif [ -n "${EXO_LOG_COMMAND:-}" ]; then
    bash -c "$EXO_LOG_COMMAND"
  else
    journalctl -u "$EXO_SERVICE" --since "$since" --no-pager -o cat
  fi
}

# pids of runners started from this install whose node is gone (runners are
# `PYTHON -m exo.worker.runner SPEC NODE_PID`: the command line names their node).
orphaned_runners() {
  local dir argv stat
  for dir in /proc/[0-9]*; do
    mapfile -d '' -t argv 2>/dev/null <"$dir/cmdline" || continue
    if [ "${#argv[@]}" -lt 5 ] || [ "${argv[1]}" != -m ] || [ "${argv[2]}" != exo.worker.runner ]; then continue; fi
    case ${argv[0]} in "$VENV"/*) ;; *) continue ;; esac
    stat=$(cat "/proc/${argv[4]}/stat" 2>/dev/null) || stat="gone) Z"  # a node gone counts as a zombie
    stat=${stat##*) }
    if [ "${stat%% *}" = Z ]; then printf '%s\n' "${dir#/proc/}"; fi
  done
}

failures=0
ok() { say "ok    $*"; }
fail() {
  say "FAIL  $*"
  failures=$((failures + 1))
}

# Ready: /health says ok and the node has found its cluster's master (a lone node elects itself in
# a few seconds).
deadline=$((SECONDS + wait_s))
until http_check "$url/health" status ok 2>/dev/null && http_check "$url/state" "masterId|master_id" 2>/dev/null; do
  log=$(recent_log 2>/dev/null) || log=""
  if [ $SECONDS -ge "$deadline" ] || grep -qE "$BAD_LOG" <<<"$log"; then break; fi
  sleep 1
done

if [ "$SYSTEMCTL" = none ]; then
  say "skip  service state (no systemctl)"
else
  state=$(run_systemctl is-active "$EXO_SERVICE" 2>/dev/null) || true
  if [ "$state" = active ]; then ok "service $EXO_SERVICE is active"; else fail "service $EXO_SERVICE is ${state:-unknown}"; fi
fi

if why=$(http_check "$url/health" status ok 2>&1); then ok "$url/health says ok"; else fail "$why"; fi
if why=$(http_check "$url/state" "masterId|master_id" 2>&1); then ok "$url/state answers, with a master"; else fail "$why"; fi

if log=$(recent_log 2>&1); then
  bad=$(grep -E "$BAD_LOG" <<<"$log") || true
  if [ -z "$bad" ]; then
    ok "no tracebacks or race-condition errors in the log since $since"
  else
    fail "the log since $since has $(wc -l <<<"$bad") bad line(s), the first:"
    head -n 5 <<<"$bad" | indent >&2
  fi
else
  fail "could not read the log: $log"
fi

if "$VENV/bin/exo" doctor --help >/dev/null 2>&1; then
  mapfile -t assignments < <(printf 'EXO_HOME=%s\n' "$STATE_DIR"; env_assignments)
  if report=$(env "${assignments[@]}" timeout 120 "$VENV/bin/exo" doctor --url "$url" --no-browse 2>&1); then
    ok "exo doctor finds no issues"
  else
    fail "exo doctor finds issues ('exo cleanup' stops orphaned runners):"
    { grep -E '^(issue|verdict):' <<<"$report" || tail -n 5 <<<"$report"; } | indent >&2
  fi
else
  say "note  this install has no 'exo doctor'; looking for orphaned runners in /proc instead"
  orphans=$(orphaned_runners | tr '\n' ' ')
  if [ -z "$orphans" ]; then ok "no orphaned runners"; else fail "orphaned runners found: pids ${orphans% }"; fi
fi

if [ "$failures" -gt 0 ]; then die 1 "$failures check(s) failed"; fi
say "deployment is healthy"
