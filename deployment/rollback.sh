#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Put back a backup that deploy.sh made: the install, its settings and the unit; then restart the
# service and validate it.
#
#   rollback.sh [--root DIR] [--no-validate] BACKUP
#   rollback.sh [--root DIR] --list
#
#   BACKUP          a backup's directory name (such as 20250101-120000), its path, or "latest"
#   --list          list the backups, oldest first
#   --root DIR      the install lives under DIR (also EXO_ROOT)
#   --no-validate   restore and restart only
#
# Exit status: 0 restored and healthy; 1 restored but unhealthy, or restoring failed; 2 bad usage or
# no such backup.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

name=""
check=yes
list=no
while [ $# -gt 0 ]; do
  case $1 in
    --root) EXO_ROOT=$(value "$@"); shift ;;
    --no-validate) check=no ;;
    --list) list=yes ;;
    -h | --help) usage && exit 0 ;;
    -*) die 2 "unknown option $1 (see --help)" ;;
    *) name=$1 ;;
  esac
  shift
done
set_paths

if [ "$list" = yes ]; then
  list_backups | while IFS= read -r dir; do
    printf '%s  %s  %s\n' "$(basename "$dir")" "$(sed -n 's/^version=//p' "$dir/manifest")" \
      "$(sed -n 's/^reason=//p' "$dir/manifest")"
  done
  exit 0
fi
[ -n "$name" ] || die 2 "which backup? (rollback.sh --list shows them)"
backup=$(resolve_backup "$name")

take_lock
restore_backup "$backup"
say "restarting $EXO_SERVICE with $(installed_version)"
run_systemctl restart "$EXO_SERVICE"
if [ "$check" = yes ]; then
  validate || die 1 "restored $backup, but the service is not healthy"
fi
say "rolled back to $backup"
