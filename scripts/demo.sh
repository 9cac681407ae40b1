#!/usr/bin/env bash
# Set up the project and run the summarization demo on the default model; extra arguments go to `semshare demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
export HF_HUB_OFFLINE=1
exec "$root/.venv/bin/semshare" demo "$@"
