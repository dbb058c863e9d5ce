#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Install exo as a systemd service: a system user, a fast BLAS (BLIS, with apt), its directories, a
# virtual environment holding exo, the settings file and the unit; then daemon-reload and enable.
# Running it again upgrades in place and keeps the settings file.
#
#   install.sh [--root DIR] [--user NAME] [--no-systemctl] [--start] [--from-dir DIR | SPEC]
#
#   SPEC            what pip installs into /opt/exo/venv: a wheel, a source checkout or a git URL
#                   (default: the checkout this script is in)
#   --from-dir DIR  copy DIR into place as /opt/exo/venv as it is, without pip: a venv already built
#                   for that path (by an image build, say); the tests use a small stand-in
#   --root DIR      install under DIR, with the unit naming the paths under DIR, and create no user:
#                   for tests and trials (also EXO_ROOT)
#   --user NAME     the service's user (default exo)
#   --no-systemctl  do not call systemctl (also SYSTEMCTL=none)
#   --start         also (re)start the service
#
# Paths: /opt/exo/venv (the install), /etc/exo/exo.env (settings; kept if present), /var/lib/exo
# (EXO_HOME: identity, term, model cache), /etc/systemd/system/exo.service, /var/backups/exo (backups).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

mode=pip
source=$(cd "$DEPLOYMENT_DIR/.." && pwd)
user=exo
start=no
while [ $# -gt 0 ]; do
  case $1 in
    --root) EXO_ROOT=$(value "$@"); shift ;;
    --user) user=$(value "$@"); shift ;;
    --from-dir) mode=dir source=$(value "$@"); shift ;;
    --no-systemctl) SYSTEMCTL=none ;;
    --start) start=yes ;;
    -h | --help) usage && exit 0 ;;
    -*) die 2 "unknown option $1 (see --help)" ;;
    *) mode=pip source=$1 ;;
  esac
  shift
done
set_paths
[[ $user =~ ^[a-z_][a-z0-9_-]*$ ]] || die 2 "'$user' is not a user name"
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
  die 1 "run as root to install into the system (or give --root DIR to install under a directory)"
fi

if [ -n "$ROOT" ]; then
  say "under root $ROOT: not creating user $user (that would change this host)"
elif getent passwd "$user" >/dev/null; then
  say "user $user exists"
else
  say "creating system user $user"
  useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
    --shell "$(command -v nologin || echo /usr/sbin/nologin)" --comment "exo node" "$user"
fi

# A fast BLAS for MLX's CPU backend, as setup.sh installs it; the node picks the fastest one installed.
if [ -n "$ROOT" ]; then
  :  # a trial under a root changes nothing on the host
elif ldconfig -p 2>/dev/null | grep -q 'libblis\.so'; then
  say "BLIS (fast BLAS) is installed"
elif command -v apt-get >/dev/null; then
  say "installing libblis4-pthread (fast BLAS for MLX)"
  { apt-get update -qq && apt-get install -y -qq libblis4-pthread; } >/dev/null 2>&1 ||
    say "could not install libblis4-pthread; exo will use MLX's slower bundled BLAS"
else
  say "no apt-get: install BLIS (libblis) yourself, or exo uses MLX's slower bundled BLAS"
fi

install -d -m 0755 "$OPT_DIR" "$(dirname "$UNIT_FILE")"
install -d -m 0750 "$ETC_DIR" "$STATE_DIR"
install -d -m 0700 "$BACKUP_DIR"
if [ -z "$ROOT" ]; then
  chown "$user:$user" "$STATE_DIR"
  chgrp "$user" "$ETC_DIR"  # the node reads files named there, such as EXO_CLUSTER_SECRET_FILE
fi

install_release "$mode" "$source"

if [ -f "$ENV_FILE" ]; then
  say "keeping the settings in $ENV_FILE"
else
  install -m 0640 "$DEPLOYMENT_DIR/exo.env" "$ENV_FILE"
  if [ -z "$ROOT" ]; then chgrp "$user" "$ENV_FILE"; fi
  say "wrote default settings to $ENV_FILE"
fi

# The unit as shipped names /opt/exo, /etc/exo and /var/lib/exo; under a root it names those under it.
sed -e 's#/opt/exo#@OPT@#g; s#/etc/exo#@ETC@#g; s#/var/lib/exo#@STATE@#g' \
  -e "s#@OPT@#$OPT_DIR#g; s#@ETC@#$ETC_DIR#g; s#@STATE@#$STATE_DIR#g" \
  -e "s#^User=exo\$#User=$user#; s#^Group=exo\$#Group=$user#" \
  "$DEPLOYMENT_DIR/exo.service" >"$UNIT_FILE.new"
chmod 0644 "$UNIT_FILE.new"
mv "$UNIT_FILE.new" "$UNIT_FILE"
say "installed the unit $UNIT_FILE"

run_systemctl daemon-reload
run_systemctl enable "$EXO_SERVICE"
if [ "$start" = yes ]; then run_systemctl restart "$EXO_SERVICE"; fi

say "installed $(installed_version) in $VENV"
say "settings: $ENV_FILE; start: systemctl start $EXO_SERVICE; check: $DEPLOYMENT_DIR/validate-deployment.sh"
