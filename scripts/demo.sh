#!/usr/bin/env bash
# The quick-start demo: set up the environment (idempotent), then run
# `nextchat demo`. Extra arguments go to it (see `nextchat demo --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ros_env.sh"
exec "$VENV/bin/nextchat" demo "$@"
