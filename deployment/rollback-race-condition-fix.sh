#!/usr/bin/env bash
# The runbook's name for rollback.sh: puts back a backup that deploy-race-condition-fix.sh made, from
# deployment/backups/ beside this script (EXO_BACKUP_DIR overrides). BACKUP_DIR is a backup's path
# (deployment/backups/20250101-120000), its name, or "latest".
#
#   rollback-race-condition-fix.sh [rollback.sh's options] BACKUP_DIR
#   rollback-race-condition-fix.sh --list
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,/^[^#]/{/^#/!d; s/^# \{0,1\}//; p}' "$0"
  printf '\nrollback.sh --help:\n'
  exec "$here/rollback.sh" --help
fi
export EXO_BACKUP_DIR=${EXO_BACKUP_DIR:-$here/backups}
exec "$here/rollback.sh" "$@"
