"""Concurrent raters against the real threaded server: no answer lost, none doubled.

A short version of `python -m palm_rlhf.feedback.loadtest --raters 50 --seconds 60`.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("waitress", reason="the load test serves with waitress: pip install 'palm-rlhf[feedback]'")


@pytest.mark.slow
def test_concurrent_raters_lose_nothing():
    command = [sys.executable, "-m", "palm_rlhf.feedback.loadtest", "--raters", "12", "--seconds", "8",
               "--prompts", "60", "--resend", "5", "--json"]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["ok"] > 50 and figures["errors"] == 0
    assert figures["rows"] == figures["ok"]  # every acknowledged answer is a row, and no other row
    assert figures["lost"] == figures["unexpected"] == figures["duplicate_rows"] == 0
    assert figures["resent"] > 0 and figures["resend_409"] == figures["resent"]
