"""The examples run offline on the default model with --short and report the reuse they got."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.real_model
@pytest.mark.parametrize(
    "script, reused",
    [
        ("langchain_map_reduce.py", "similarity"),
        ("llamaindex_query_engine.py", "similarity"),
        ("langchain_agent.py", "similarity"),
    ],
)
def test_example_runs_short(script, reused):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--short"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "borrowed" in completed.stdout
    assert reused in completed.stdout, completed.stdout
