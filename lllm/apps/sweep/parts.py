"""The rows of a sweep on disk: the Parquet schema and `<out>.parts/`, the part files that each finished batch
commits atomically, so that an interrupted sweep resumes where it stopped."""

from __future__ import annotations

from typing import TYPE_CHECKING

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lllm.errors import SweepError
from lllm.io.files import replace_durably, write_bytes_atomically

from lllm.apps.sweep.prompts import prompt_id

if TYPE_CHECKING:  # the config is defined with the engines, which import this module
    from lllm.apps.sweep.engines import SweepConfig


TIMING_COLUMNS = ("seconds", "cpu_seconds")  # the only columns that differ between runs of the same sweep


# One row per (model, prompt). Fixed, so that parts of successful and failed prompts concatenate.
SCHEMA = pa.schema([
    ("model", pa.string()),
    ("model_sha256", pa.string()),
    ("dtype", pa.string()),
    ("prompt_index", pa.int64()),  # position in the prompt list of the run that assembled <out>
    ("prompt_id", pa.string()),  # sha256 of the prompt text, first 16 hex digits
    ("prompt", pa.string()),
    ("n_tokens", pa.int64()),
    ("token_ids", pa.list_(pa.int64())),
    ("tokens", pa.list_(pa.string())),
    ("next_token_ids", pa.list_(pa.int64())),  # top next tokens by the model's own logits, best first
    ("next_tokens", pa.list_(pa.string())),
    ("next_probs", pa.list_(pa.float64())),
    ("final_method", pa.string()),  # how the final J⁺ was computed: "reverse", or "forward" with the layers
    ("reconstruction_error", pa.float64()),  # std(y − Σ J⁺ᵢxᵢ − c)/std(y) of the final J⁺
    ("stable_rank", pa.float64()),  # of the token-combined final J⁺ (d, T·d)
    ("token_stable_ranks", pa.list_(pa.float64())),  # of every block J⁺ᵢ (d, d)
    ("layers", pa.list_(pa.int64())),  # the layers of the cumulative columns below ([] when skipped)
    ("cumulative_stable_rank_layer", pa.list_(pa.float64())),  # input embeddings → layer output, per layer
    ("cumulative_stable_rank_attn", pa.list_(pa.float64())),  # → attention output (before its residual add)
    ("cumulative_stable_rank_mlp", pa.list_(pa.float64())),  # → MLP output (before its residual add)
    ("cumulative_max_error", pa.float64()),  # worst reconstruction error over those cumulative Jacobians
    ("u_token_ids", pa.list_(pa.int64())),  # top token of each top left singular vector u₁, u₂, … of J⁺_last
    ("u_tokens", pa.list_(pa.string())),
    ("u_singular_values", pa.list_(pa.float64())),
    ("u1_matches_prediction", pa.bool_()),  # top token of u₁ == greedy next token
    ("seconds", pa.float64()),  # wall clock of the prompt's analysis
    ("cpu_seconds", pa.float64()),  # CPU time of its process meanwhile: the cost, also on a busy machine
    ("lllm_version", pa.string()),
    ("error", pa.string()),  # None on success, "ExceptionType: message" when the prompt failed
])


class PartStore:
    """The `<out>.parts/` directory: a manifest, complete part files, a run log and an exclusive lock."""

    MANIFEST = "sweep.json"
    RUNS = "runs.jsonl"

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")
        self._lock_file = None

    def open(self, config: SweepConfig) -> None:
        """Take the lock, check or write the manifest, and delete temporaries of killed runs."""
        foreign = self.dir.is_dir() and any(not p.name.startswith(".") for p in self.dir.iterdir())
        if foreign and not (self.dir / self.MANIFEST).exists():
            raise SweepError(f"{self.dir} exists and is not the parts directory of a sweep; lllm does not write "
                             "into a directory it did not make. Give another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.dir / ".lock", "w")
        try:  # released by the kernel when the holder dies, so a killed run never leaves it stale
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise SweepError(f"another sweep is writing {self.dir}; wait for it or use another --out") from None
        manifest = self.dir / self.MANIFEST
        if manifest.exists():
            stored = json.loads(manifest.read_text())
            if stored != config.manifest():
                diff = {k: (stored.get(k), v) for k, v in config.manifest().items() if stored.get(k) != v}
                self.close()
                raise SweepError(f"{self.dir} holds rows of another sweep (stored vs requested: {diff}); "
                                 f"use another --out, or delete {self.dir} to start over")
        else:
            write_bytes_atomically(manifest, json.dumps(config.manifest(), indent=1).encode())
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink()

    def close(self) -> None:
        """Release the lock."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def parts(self) -> list[Path]:
        """The committed part files, oldest name first."""
        return sorted(self.dir.glob("part-*.parquet"))

    def read(self) -> pa.Table:
        """Every committed row."""
        tables = [pq.read_table(part, schema=SCHEMA) for part in self.parts()]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def commit(self, rows: list[dict[str, Any]], run_id: str, number: int) -> Path:
        """Write rows as one part file, atomically: complete or absent."""
        path = self.dir / f"part-{run_id}-{number:06d}.parquet"
        tmp = self.dir / f".{path.name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        replace_durably(tmp, path)
        return path

    def log_run(self, record: dict[str, Any]) -> None:
        """Append one JSON line describing a finished run to runs.jsonl."""
        with open(self.dir / self.RUNS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def runs(self) -> list[dict[str, Any]]:
        """The records of every finished run, oldest first."""
        path = self.dir / self.RUNS
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assemble_rows(store: PartStore, prompts: list[str]) -> pa.Table:
    """The rows of `prompts`, in their order, from the committed parts (prompt_index set by this order)."""
    table = store.read()  # parts in the order they were committed
    ids, errors = table.column("prompt_id").to_pylist(), table.column("error").to_pylist()
    # A prompt has several rows only when --retry-failed computed a failed one again: keep the latest
    # successful row, else the latest failure.
    kept = {}  # prompt id -> the position of the row that stands for it
    for position, (pid, error) in enumerate(zip(ids, errors)):
        if pid not in kept or error is None or errors[kept[pid]] is not None:
            kept[pid] = position
    order = [kept[prompt_id(p)] for p in prompts if prompt_id(p) in kept]
    selected = table.take(pa.array(order, type=pa.int64()))
    index = pa.array([i for i, p in enumerate(prompts) if prompt_id(p) in kept], type=pa.int64())
    return selected.set_column(SCHEMA.get_field_index("prompt_index"), SCHEMA.field("prompt_index"), index)
