#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deploy a new version of exo over an installed one: back up the install, its settings and the unit
# to /var/backups/exo/TIMESTAMP, install the new version, restart the service and validate it. If any
# of that fails, put the backup back (rollback.sh), restart and validate again.
#
#   deploy.sh [--root DIR] [--env FILE] [--no-rollback] [--from-dir DIR | SPEC]
#
#   SPEC            what pip installs into /opt/exo/venv: a wheel, a source checkout or a git URL
#                   (default: the checkout this script is in)
#   --from-dir DIR  copy DIR into place as the venv as it is, without pip (see install.sh)
#   --env FILE      also replace the settings, /etc/exo/exo.env, with FILE
#   --root DIR      the install lives under DIR (also EXO_ROOT)
#   --no-rollback   leave a failed version in place, to look at it
#
# EXO_VALIDATE_WAIT (default 90) is how many seconds the new version has to answer /health;
# EXO_KEEP_BACKUPS (default 5) how many backups are kept.
# Exit status: 0 deployed and healthy; 1 failed before anything changed; 2 bad usage;
# 3 the new version failed, and the previous one is back and healthy; 4 the rollback failed too.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

mode=pip
source=$(cd "$DEPLOYMENT_DIR/.." && pwd)
env_file=""
rollback=yes
while [ $# -gt 0 ]; do
  case $1 in
    --root) EXO_ROOT=$(value "$@"); shift ;;
    --env) env_file=$(value "$@"); shift ;;
    --from-dir) mode=dir source=$(value "$@"); shift ;;
    --no-rollback) rollback=no ;;
    -h | --help) usage && exit 0 ;;
    -*) die 2 "unknown option $1 (see --help)" ;;
    *) mode=pip source=$1 ;;
  esac
  shift
done
set_paths
[ -x "$VENV/bin/exo" ] || die 1 "no exo installed in $VENV: run install.sh first"
if [ -n "$env_file" ] && [ ! -f "$env_file" ]; then die 2 "no settings file $env_file"; fi

take_lock
backup=$(make_backup "before deploying $source")
say "backed up $(installed_version), its settings and unit to $backup"

# From here on, any failure puts the backup back.
phase=changing
on_exit() {
  local code=$?
  if [ "$phase" != changing ]; then return "$code"; fi
  trap - EXIT
  if [ "$rollback" = no ]; then
    die 1 "deploy failed; --no-rollback leaves it in place (the previous version is in $backup)"
  fi
  say "deploy failed; rolling back to $backup"
  exec 9>&-  # rollback.sh takes the lock itself
  if EXO_ROOT=$ROOT EXO_BACKUP_DIR=$BACKUP_DIR EXO_SERVICE=$EXO_SERVICE SYSTEMCTL=$SYSTEMCTL \
    "$DEPLOYMENT_DIR/rollback.sh" "$backup"; then
    die 3 "deploy failed; the previous version is back and healthy"
  fi
  die 4 "deploy failed and so did the rollback to $backup: the service needs a person"
}
trap on_exit EXIT

install_release "$mode" "$source"
if [ -n "$env_file" ]; then
  cat "$env_file" >"$ENV_FILE"  # over the old file, so its owner and mode stay
  say "replaced the settings with $env_file"
fi
say "restarting $EXO_SERVICE with $(installed_version)"
run_systemctl restart "$EXO_SERVICE"
validate || die 1 "the new version failed validation"

phase=finished
prune_backups "${EXO_KEEP_BACKUPS:-5}"
say "deployed $(installed_version); the previous version is in $backup"
