#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Is the exo service healthy? Each check is reported: the service is active; GET /health answers
# "status": "ok" from this unit's node (its node id is the one in the unit's EXO_HOME, not another exo
# on the port) with its runners Ready; GET /state answers with a master elected; the log of the unit's
# current run holds no traceback or race-condition error (Traceback, Queue is closed,
# ClosedResourceError); and `exo doctor` finds no issues, orphaned runners among them (an install
# without `exo doctor`: no runner outlived its node).
#
#   validate-deployment.sh [--root DIR] [--since WHEN] [--wait SECONDS] [--url URL] [--runners N]
#
#   --root DIR      the install lives under DIR (default: /; also EXO_ROOT)
#   --since WHEN    read the log from WHEN, a systemd time such as -10min or @1700000000 (default: the
#                   unit's current run, by its invocation id, so an earlier run's lines never count)
#   --wait SECONDS  first wait up to this long for the node to answer, be ready and have a master
#                   (default 0); a bad line in its log ends the wait
#   --url URL       the node's API (default: from EXO_API_HOST and EXO_API_PORT in ROOT/etc/exo/exo.env)
#   --runners N     how many runners must be Ready (default 1, or 0 when EXO_ARGS has --no-preload);
#                   every runner the node has must be Ready in any case
#
# The log is EXO_LOG_FILE if set (the current run's log), else the output of EXO_LOG_COMMAND, else
# journalctl -u exo for the current invocation (or --since WHEN). EXO_API_KEY (or the settings file's)
# is sent to /state. Exit status: 0 all checks pass, 1 some failed, 2 bad usage.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

since=""
wait_s=0
url=${EXO_API_URL:-}
runners=""
while [ $# -gt 0 ]; do
  case $1 in
    --root) EXO_ROOT=$(value "$@"); shift ;;
    --since) since=$(value "$@"); shift ;;
    --wait) wait_s=$(value "$@"); shift ;;
    --url) url=$(value "$@"); shift ;;
    --runners) runners=$(value "$@"); shift ;;
    -h | --help) usage && exit 0 ;;
    *) die 2 "unknown argument $1 (see --help)" ;;
  esac
  shift
done
set_paths
case $wait_s in '' | *[!0-9]*) die 2 "--wait takes whole seconds, not '$wait_s'" ;; esac
if [ -z "$runners" ]; then
  case " $(env_value EXO_ARGS) " in *" --no-preload "*) runners=0 ;; *) runners=1 ;; esac
fi
case $runners in '' | *[!0-9]*) die 2 "--runners takes a count, not '$runners'" ;; esac
# The node id of the unit's node: the one its EXO_HOME holds (written at its first start).
node_id_file=$(env_value EXO_HOME "$STATE_DIR")/node_id

BAD_LOG='Traceback|Queue is closed|ClosedResourceError'

if [ -z "$url" ]; then
  host=$(env_value EXO_API_HOST 127.0.0.1)
  case $host in 0.0.0.0 | :: | "[::]") host=127.0.0.1 ;; *:*) host="[${host#[}" && host="${host%]}]" ;; esac
  url=http://$host:$(env_value EXO_API_PORT 52415)
fi
EXO_API_KEY=${EXO_API_KEY:-$(env_value EXO_API_KEY)}
export EXO_API_KEY

# http_check URL [KEY [VALUE]]: URL answers 200 with a JSON object (whose KEY is VALUE, or is set);
# else say why, on stderr. KEY "runners" checks /health's runners: all Ready, and at least VALUE.
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
if want[:1] == ["runners"]:
    ready, runners = body.get("runners_ready", 0), body.get("runners") or {}
    if ready < int(want[1]) or ready < len(runners):
        sys.exit(f"{url}: {ready} runner(s) Ready of {max(len(runners), int(want[1]))} ({runners or 'none yet'})")
elif want:  # a key, or alternatives: "masterId|master_id" (/state before its camelCase)
    key = next((k for k in want[0].split("|") if k in body), want[0].split("|")[0])
    if body.get(key) != want[1] if len(want) > 1 else not body.get(key):
        sys.exit(f"{url}: {key} is {body.get(key)!r}" + (f", not {want[1]!r}" if len(want) > 1 else ""))
PY
}

# The unit's node id, or nothing before its first start.
unit_node_id() { cat "$node_id_file" 2>/dev/null || true; }

# Ready: the unit's own node answers /health with "ok", its runners are Ready, and it has found its
# cluster's master (a lone node elects itself in a few seconds).
ready() {
  local id
  id=$(unit_node_id)
  [ -n "$id" ] && http_check "$url/health" status ok && http_check "$url/health" node_id "$id" &&
    http_check "$url/health" runners "$runners" && http_check "$url/state" "masterId|master_id"
}

# The log of the unit's current run (its invocation id changes at every start), or since --since.
recent_log() {
  if [ -n "${EXO_LOG_FILE:-}" ]; then
    tail -n "${EXO_LOG_LINES:-5000}" "$EXO_LOG_FILE"
  elif [ -n "${EXO_LOG_COMMAND:-}" ]; then
    bash -c "$EXO_LOG_COMMAND"
  elif [ -n "$since" ]; then
    journalctl -u "$EXO_SERVICE" --since "$since" --no-pager -o cat
  else
    local invocation
    invocation=$(run_systemctl show -p InvocationID --value "$EXO_SERVICE")
    [ -n "$invocation" ] || { echo "the unit $EXO_SERVICE has not run" >&2; return 1; }
    journalctl "_SYSTEMD_INVOCATION_ID=$invocation" --no-pager -o cat
  fi
}
log_scope() { if [ -n "$since" ]; then echo "since $since"; else echo "of the unit's current run"; fi; }

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

deadline=$((SECONDS + wait_s))
until ready 2>/dev/null; do
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
id=$(unit_node_id)
if [ -z "$id" ]; then
  fail "no node id in $node_id_file: the unit's node has never started"
elif why=$(http_check "$url/health" node_id "$id" 2>&1); then
  ok "the node answering is this unit's (node $id)"
else
  case $why in *"node_id is"*) why="$why: another process answers on $url, not this unit's node" ;; esac
  fail "$why"
fi
if why=$(http_check "$url/health" runners "$runners" 2>&1); then
  ok "runners Ready (at least $runners)"
else
  fail "$why"
fi
if why=$(http_check "$url/state" "masterId|master_id" 2>&1); then ok "$url/state answers, with a master"; else fail "$why"; fi

if log=$(recent_log 2>&1); then
  bad=$(grep -E "$BAD_LOG" <<<"$log") || true
  if [ -z "$bad" ]; then
    ok "no tracebacks or race-condition errors in the log $(log_scope)"
  else
    fail "the log $(log_scope) has $(wc -l <<<"$bad") bad line(s), the first:"
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
