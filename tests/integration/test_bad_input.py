"""Bad input on a real model, through the CLI: out-of-range layers, and an unwritable results cache."""

from __future__ import annotations

import lllm
from lllm.apps import cli


def test_cli_refuses_a_layer_beyond_the_last(cli_smollm2, cli_error, tmp_path):
    """`lllm analyze --layers 30` on the 30-layer SmolLM2 used to report layer 0."""
    line = cli_error("analyze", "--out", str(tmp_path / "o"), "--layers", "30", "--no-progress")
    assert "layers [30] are outside the model's 30 layers" in line
    assert not (tmp_path / "o").exists()


def test_cli_analyze_with_an_unwritable_results_cache_warns_and_writes_out(cli_smollm2, capsys, caplog, tmp_path,
                                                                          monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "results").write_text("a file where the results directory should be")
    monkeypatch.setenv("LLLM_CACHE_DIR", str(cache))
    out = tmp_path / "out"
    code = cli.main(["analyze", "--prompt", "The cat", "--out", str(out), "--layers", "-1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "cannot be written" in caplog.text  # on stderr through logging's last-resort handler outside pytest
    assert (out / "analysis" / "tensors.safetensors").exists() and (out / "analysis-summary.json").exists()
    assert lllm.load_result(out / "analysis")[1]["analysis"]["relative_error"] < 1e-4
