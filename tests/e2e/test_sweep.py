"""lllm.apps.sweep across processes: a local Dask cluster gives the local engine's rows, and `lllm sweep` run as
a subprocess, killed or interrupted, resumes with only the missing prompts. tests/unit/test_sweep.py has the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import SWEEP_LOADER, id_prompts
from tiny import SWEEP_MODEL as MODEL
from tiny import tiny_sweep as sweep

from lllm.apps.sweep import TIMING_COLUMNS, PartStore, loads_in_process, local_cluster, run_sweep

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


def _plain(df) -> list[dict]:
    """Rows as plain Python values (lists, floats, None) without the timing columns, for exact comparison."""
    return pa.Table.from_pandas(df.drop(columns=list(TIMING_COLUMNS)), preserve_index=False).to_pylist()


def test_dask_engine_rows_equal_local_rows_and_each_worker_loads_once(tmp_path):
    prompts = id_prompts(12, (3, 12), seed=1)
    local = sweep(tmp_path / "local.parquet", prompts, engine="local", batch_size=2)
    with local_cluster(2) as cluster:  # 2 worker processes, 1 thread each, on 127.0.0.1, no dashboard
        dask = sweep(tmp_path / "dask.parquet", prompts, engine="dask", batch_size=2,
                     scheduler=cluster.scheduler_address)
        from distributed import Client

        with Client(cluster) as client:
            loads = client.run(loads_in_process)
    assert local["error"].isna().all()
    # same code, same thread count (1): every float is bitwise the same in both engines
    assert _plain(dask) == _plain(local)
    key = f"{SWEEP_LOADER}|{MODEL}|float64"
    per_worker = [info["loads"].get(key, 0) for info in loads.values()]
    assert len({info["pid"] for info in loads.values()}) == 2 and os.getpid() not in {i["pid"] for i in loads.values()}
    assert max(per_worker) == 1 and sum(per_worker) >= 1  # 6 batches, at most one load per process
    assert PartStore(tmp_path / "dask.parquet").runs()[-1]["model_loads"] == loads


def cli_sweep_past_its_first_commit(prompt_file: Path, out: Path, loader: str, *options: str) -> subprocess.Popen:
    """`lllm sweep` on the tiny model in a subprocess (stderr piped as text), returned once a part is committed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    cmd = [sys.executable, "-m", "lllm.apps.cli", "sweep", "--model", MODEL, "--loader", loader, "--prompts",
           str(prompt_file), "--out", str(out), "--dtype", "float64", "--no-progress", *options]
    # SIGINT as the terminal sends it; a child of a non-interactive shell may inherit it ignored, so restore it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    store = PartStore(out)
    deadline = time.monotonic() + 120
    while not (store.dir.is_dir() and store.parts()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


def test_killed_sweep_resumes_computing_only_missing_prompts(tmp_path):
    prompts = id_prompts(40, (40, 60), seed=2)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# tiny-model prompts\n" + "\n".join(prompts) + "\n")
    out = tmp_path / "killed.parquet"
    proc = cli_sweep_past_its_first_commit(prompt_file, out, SWEEP_LOADER)
    store = PartStore(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    committed = len(store.read())
    assert not out.exists() and 1 <= committed < len(prompts), "the kill must land after a commit, before the end"

    resumed = sweep(out, prompt_file)
    run = store.runs()[-1]
    assert run["already_done"] == committed and run["computed"] == len(prompts) - committed
    assert len(store.read()) == len(prompts)  # the parts hold each prompt once: nothing computed twice
    uninterrupted = sweep(tmp_path / "whole.parquet", prompt_file)
    assert list(resumed["prompt"]) == prompts and resumed["prompt_id"].is_unique
    assert _plain(resumed) == _plain(uninterrupted)
    assert pq.read_table(out).num_rows == len(prompts)


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_ctrl_c_stops_the_sweep_keeps_its_rows_and_the_rerun_completes_it(tmp_path, engine):
    prompts = id_prompts(12, (3, 6), seed=4)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "interrupted.parquet"
    proc = cli_sweep_past_its_first_commit(prompt_file, out, "tiny:slow_tiny_loader", "--engine", engine)
    store = PartStore(out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    committed = len(store.read())
    assert proc.returncode == 130, err
    assert not out.exists() and 1 <= committed < len(prompts), "the signal must land after a commit, before the end"
    assert f"interrupted; {committed} prompts are committed" in err and "Traceback" not in err.split("interrupted")[-1]

    resumed = run_sweep(MODEL, prompt_file, out, loader="tiny:slow_tiny_loader", dtype="float64", progress=False)
    assert store.runs()[-1]["already_done"] == committed
    assert _plain(resumed) == _plain(sweep(tmp_path / "whole.parquet", prompt_file))  # the sleep changes no number
