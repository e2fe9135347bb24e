#!/usr/bin/env bash
# The quick-start demo: set up the environment (idempotent), then run
# `nextchat demo`. Extra arguments go to it (see `nextchat demo --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEXTCHAT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( $$ % 100 + 1 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export ROS_LOG_DIR="${ROS_LOG_DIR:-$(mktemp -d -t nextchat-ros-log.XXXXXX)}"
exec "$VENV/bin/nextchat" demo "$@"
