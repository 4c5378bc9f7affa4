"""The benchmark harness runs: a worker past its memory cap is killed and reported, and the quick mode writes its
report and plot (subprocesses)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_past_the_memory_cap_is_killed_and_reported():
    config = dataclasses.replace(harness.QUICK, memory_cap=1e-6)  # a few kB: exceeded at the first poll
    job = {"model": "tiny-llama", "method": "lllm_full", "tokens": 8, "options": {}}
    assert harness.in_subprocess(job, config)["failed"].startswith("killed at")


def test_harness_runs_end_to_end_in_quick_mode(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/harness.py", "--quick", "--model", "tiny-llama",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    results = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## (a)", "## (b)", "## (c)", "## (d)", "load average (1/5/15 min)"):
        assert heading in results
    assert "within the 1e-5 float32 criterion" in results
    assert "within the 1e-4 criterion" in results
    assert (tmp_path / "time_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
