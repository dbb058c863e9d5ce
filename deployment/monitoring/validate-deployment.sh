#!/usr/bin/env bash
# The runbook's path to validate-deployment.sh: the same checks, options and exit status.
#
#   monitoring/validate-deployment.sh [validate-deployment.sh's options]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,/^[^#]/{/^#/!d; s/^# \{0,1\}//; p}' "$0"
  printf '\nvalidate-deployment.sh --help:\n'
fi
exec "$here/validate-deployment.sh" "$@"
