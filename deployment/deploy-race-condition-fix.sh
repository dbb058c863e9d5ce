#!/usr/bin/env bash
# The runbook's name for deploy.sh: deploys as it does (same options), keeping the runbook's layout
# beside this script: backups in deployment/backups/TIMESTAMP/ (EXO_BACKUP_DIR overrides), and
# everything it says also in deployment/logs/deploy_TIMESTAMP.log (EXO_DEPLOY_LOG_DIR overrides).
# The install itself stays where docs/deployment.md says (/opt/exo, /etc/exo, the unit).
#
#   deploy-race-condition-fix.sh [deploy.sh's options]
#
# Follow a deploy with: tail -f deployment/logs/deploy_*.log
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,/^[^#]/{/^#/!d; s/^# \{0,1\}//; p}' "$0"
  printf '\ndeploy.sh --help:\n'
  exec "$here/deploy.sh" --help
fi
export EXO_BACKUP_DIR=${EXO_BACKUP_DIR:-$here/backups}
logs=${EXO_DEPLOY_LOG_DIR:-$here/logs}
install -d -m 0700 "$EXO_BACKUP_DIR"  # backups hold the settings, and with them any secret
mkdir -p "$logs"
log=$logs/deploy_$(date +%Y%m%d-%H%M%S).log
echo "deploy-race-condition-fix: logging to $log; backups in $EXO_BACKUP_DIR" | tee "$log" >&2
"$here/deploy.sh" "$@" 2>&1 | tee -a "$log" >&2
exit "${PIPESTATUS[0]}"
