# shellcheck shell=bash
# Shared by install.sh, deploy.sh, rollback.sh and validate-deployment.sh: where things live (all under
# one root, so tests run the scripts in a temporary directory), messages, systemctl, backups, restore.
#
# Settings (environment): EXO_ROOT (prefix of every path, default none), EXO_SERVICE (unit name, exo),
# SYSTEMCTL (the systemctl command; "none" skips it), EXO_BACKUP_DIR (default ROOT/var/backups/exo),
# EXO_KEEP_BACKUPS (how many backups deploy keeps, 5), PYTHON (python3).

shopt -s inherit_errexit  # a failure inside $(...) fails the script too

DEPLOYMENT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=$(basename "$0" .sh)
EXO_SERVICE=${EXO_SERVICE:-exo}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
PYTHON=${PYTHON:-python3}

# The comment block under a script's first line, as its --help.
usage() { sed -n '2,/^[^#]/{/^#/!d; /^# shellcheck/d; s/^# \{0,1\}//; p}' "$0"; }

# value OPTION "$@": the argument after OPTION, or a usage error.
value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then die 2 "$1 needs a value (see --help)"; fi
  printf '%s\n' "$2"
}

indent() { sed 's/^/        /'; }

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# die CODE MESSAGE
die() {
  local code=$1
  shift
  say "$*"
  exit "$code"
}

# Paths, from EXO_ROOT; call again after a --root option changed it.
# shellcheck disable=SC2034  # some are used only by the scripts that source this
set_paths() {
  ROOT=${EXO_ROOT:-}
  ROOT=${ROOT%/}
  case $ROOT in
    *[[:space:]#\&\\]*) die 2 "root $ROOT: no spaces, '#', '&' or '\\' please (it is written into the unit)" ;;
  esac
  case $ROOT in "" | /*) ;; *) ROOT=$PWD/$ROOT ;; esac
  OPT_DIR=$ROOT/opt/exo
  VENV=$OPT_DIR/venv
  ETC_DIR=$ROOT/etc/exo
  ENV_FILE=$ETC_DIR/exo.env
  STATE_DIR=$ROOT/var/lib/exo
  UNIT_FILE=$ROOT/etc/systemd/system/$EXO_SERVICE.service
  BACKUP_DIR=${EXO_BACKUP_DIR:-$ROOT/var/backups/exo}
}
set_paths

# systemctl ARGS..., or only a note when SYSTEMCTL=none (--no-systemctl).
run_systemctl() {
  if [ "$SYSTEMCTL" = none ]; then
    say "no systemctl: skipped 'systemctl $*'"
    return 0
  fi
  local cmd
  read -r -a cmd <<<"$SYSTEMCTL"
  "${cmd[@]}" "$@"
}

# The value of KEY in the environment file (the last KEY=value line), else DEFAULT. The file is
# read, never sourced: systemd's EnvironmentFile is not shell.
env_value() {
  local key=$1 default=${2:-} line value=""
  if [ -r "$ENV_FILE" ]; then
    while IFS= read -r line || [ -n "$line" ]; do
      line=${line#"${line%%[![:space:]]*}"}
      case $line in "$key="*) value=${line#"$key="} ;; esac
    done <"$ENV_FILE"
  fi
  value=${value%\"}
  value=${value#\"}
  value=${value%\'}
  value=${value#\'}
  printf '%s\n' "${value:-$default}"
}

# Every EXO_* assignment of the environment file, as KEY=value words for env(1).
env_assignments() {
  local line
  [ -r "$ENV_FILE" ] || return 0
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in EXO_*=*) printf '%s=%s\n' "${line%%=*}" "$(env_value "${line%%=*}")" ;; esac
  done <"$ENV_FILE"
}

# install_release MODE SOURCE: put a version of exo into VENV.
#   pip SPEC   pip-installs SPEC (a wheel, a source checkout, a git URL) into VENV, creating it if needed
#   dir DIR    copies DIR into place as VENV, as it is (no pip): a venv already built for VENV's path
install_release() {
  local mode=$1 source=$2
  case $mode in
    pip)
      if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
      fi
      say "pip installing $source into $VENV"
      "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$source"
      ;;
    dir)
      [ -x "$source/bin/exo" ] || die 2 "$source has no bin/exo: not an exo install"
      say "copying $source into place as $VENV"
      rm -rf "$VENV.new"
      cp -a "$source/." "$VENV.new"
      swap_into_place "$VENV.new" "$VENV"
      ;;
    *) die 2 "unknown install mode $mode" ;;
  esac
}

# swap_into_place NEW TARGET: TARGET becomes NEW by renames, so it is never half copied.
swap_into_place() {
  local new=$1 target=$2
  rm -rf "$target.replaced"
  if [ -e "$target" ]; then mv "$target" "$target.replaced"; fi
  mv "$new" "$target"
  rm -rf "$target.replaced"
}

installed_version() {
  "$VENV/bin/exo" --version 2>/dev/null || echo "unknown"
}

# One deploy or rollback at a time (the lock is released when the script exits).
take_lock() {
  install -d -m 0700 "$BACKUP_DIR"  # backups hold the settings, secrets among them
  exec 9>"$BACKUP_DIR/.lock"
  flock -n 9 || die 1 "another deploy or rollback is running (lock $BACKUP_DIR/.lock)"
}

# make_backup REASON: copy the install, its configuration and the unit to BACKUP_DIR/TIMESTAMP and
# print that directory. The state directory (identity, models) is not copied: it outlives versions.
make_backup() {
  local reason=$1 stamp dir n=1
  stamp=$(date +%Y%m%d-%H%M%S)
  dir=$BACKUP_DIR/$stamp
  while [ -e "$dir" ]; do
    n=$((n + 1))
    dir=$BACKUP_DIR/$stamp-$n
  done
  install -d -m 0700 "$dir.partial"
  cp -a "$OPT_DIR" "$dir.partial/opt-exo"
  if [ -d "$ETC_DIR" ]; then cp -a "$ETC_DIR" "$dir.partial/etc-exo"; fi
  if [ -f "$UNIT_FILE" ]; then cp -a "$UNIT_FILE" "$dir.partial/$EXO_SERVICE.service"; fi
  if [ -d "$UNIT_FILE.d" ]; then cp -a "$UNIT_FILE.d" "$dir.partial/$EXO_SERVICE.service.d"; fi
  printf 'created=%s\nversion=%s\nreason=%s\n' "$(date -Is)" "$(installed_version)" "$reason" \
    >"$dir.partial/manifest"
  mv "$dir.partial" "$dir"  # a backup directory without .partial is complete
  printf '%s\n' "$dir"
}

# Backups, oldest first.
list_backups() {
  local dir
  for dir in "$BACKUP_DIR"/[0-9]*; do
    case $dir in *.partial) continue ;; esac
    if [ -f "$dir/manifest" ]; then printf '%s\n' "$dir"; fi
  done
}

# Keep the newest KEEP backups.
prune_backups() {
  local keep=$1 all
  mapfile -t all < <(list_backups)
  local count=${#all[@]} i
  for ((i = 0; i < count - keep; i++)); do
    say "removing old backup ${all[i]}"
    rm -rf "${all[i]}"
  done
}

# resolve_backup NAME: a backup by directory name, by path, or "latest".
resolve_backup() {
  local name=$1 dir
  if [ "$name" = latest ]; then
    dir=$(list_backups | tail -n 1)
  elif [ -d "$name" ]; then
    dir=$name
  else
    dir=$BACKUP_DIR/$name
  fi
  if [ -z "$dir" ] || [ ! -f "$dir/manifest" ] || [ ! -d "$dir/opt-exo" ]; then
    die 2 "no backup '$name' in $BACKUP_DIR (rollback.sh --list shows them)"
  fi
  printf '%s\n' "$dir"
}

# restore_backup DIR: put back the install, configuration and unit that DIR holds, then daemon-reload.
restore_backup() {
  local dir=$1
  say "restoring $(sed -n 's/^version=//p' "$dir/manifest") from $dir"
  rm -rf "$OPT_DIR.restore"
  cp -a "$dir/opt-exo" "$OPT_DIR.restore"
  swap_into_place "$OPT_DIR.restore" "$OPT_DIR"
  if [ -d "$dir/etc-exo" ]; then
    rm -rf "$ETC_DIR.restore"
    cp -a "$dir/etc-exo" "$ETC_DIR.restore"
    swap_into_place "$ETC_DIR.restore" "$ETC_DIR"
  fi
  if [ -f "$dir/$EXO_SERVICE.service" ]; then cp -a "$dir/$EXO_SERVICE.service" "$UNIT_FILE"; fi
  if [ -d "$dir/$EXO_SERVICE.service.d" ]; then
    rm -rf "$UNIT_FILE.d"
    cp -a "$dir/$EXO_SERVICE.service.d" "$UNIT_FILE.d"
  fi
  run_systemctl daemon-reload
}

# validate: run validate-deployment.sh against this root, judging the unit's current run only (its
# own log lines, by invocation id: the previous run's shutdown lines are not the new version's).
validate() {
  EXO_ROOT=$ROOT EXO_SERVICE=$EXO_SERVICE SYSTEMCTL=$SYSTEMCTL \
    "$DEPLOYMENT_DIR/validate-deployment.sh" --wait "${EXO_VALIDATE_WAIT:-90}"
}
