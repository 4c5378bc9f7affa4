"""`lllm sweep`: the per-prompt analysis over a prompt set, locally or on a Dask cluster ("At scale").

The paper ends: "it should be possible to scale this investigation to well-known LLM datasets".
`run_sweep` analyzes every prompt of a set with one model and writes one row per prompt: tokens,
top next tokens, the final J⁺'s reconstruction error, per-token stable ranks, the cumulative stable
rank of every layer/attention/MLP output, and the top left singular vectors of the last token's J⁺
decoded through lm_head.

Engines. "local" runs the prompts in this process with a tqdm bar. "dask" runs the same batch
function on Dask distributed workers (a LocalCluster of worker processes on loopback, or an existing
scheduler); each worker process loads the model once and keeps it (`_cached_model`, keyed by
loader, model and dtype). Dask rather than Ray: a pure-Python install a fraction of Ray's size, no
daemon to start or leave behind, and per-worker state is just module state in the worker process,
which is all a cached model needs. With threads=1 (the default) in the local engine and in every
worker, the same float operations run in the same order everywhere, so both engines give the same
rows bit for bit; more intra-op threads split reductions differently and change the last bits.

Nothing is lost. Finished rows are committed per batch as Parquet part files in `<out>.parts/`,
each written to a temporary file and renamed into place (a part is complete or absent). A run reads
the parts first and computes only the prompts that have none, so an interrupted sweep (Ctrl-C, a
killed worker or driver) is resumed by running the same command again; an exclusive lock on the
parts directory keeps two drivers from computing the same prompts. `<out>` is assembled from the
parts, atomically, once every prompt has a row. A prompt that raises records the error in its row
(the `error` column) and the sweep goes on; a batch lost to the machinery (a worker that keeps
dying) leaves its prompts missing for the next run and fails the run with `SweepIncompleteError`.

Cost, measured in CPU seconds on SmolLM2-135M (float32, one thread): the default is faithful, every
layer/attention/MLP output of all 30 layers, from one forward sweep of the replayed network (a
tangent at token i runs on tokens i…T-1 only, so the cost grows as T(T+1)/2): 46 s at T = 7 and
95 s at T = 11. `FAST` (the CLI's --fast) keeps the layer outputs of every third layer, by reverse
mode (d rows through ℓ+1 layers each, growing as T): 49 s at T = 7 and 70 s at T = 11, so it only
pays on longer prompts; the bundled 113 prompts took a median of 48 s each. `layers="none"` skips
the depth profile: the final J⁺ alone, about 1.2·T s a prompt.
"""

from lllm.apps.sweep.engines import (
    DEFAULT_LOADER, ENGINES, FAST, SweepConfig, check_output, check_scheduler, loads_in_process, local_cluster, run_sweep,
)
from lllm.apps.sweep.parts import SCHEMA, TIMING_COLUMNS, PartStore
from lllm.apps.sweep.prompts import check_layers_spec, prompt_id, read_prompts, resolve_layers
from lllm.apps.sweep.results import load_sweep, stable_rank_long, summarize_sweep

__all__ = [
    "DEFAULT_LOADER", "ENGINES", "FAST", "SCHEMA", "TIMING_COLUMNS", "PartStore", "SweepConfig", "check_layers_spec",
    "check_output", "check_scheduler", "load_sweep", "loads_in_process", "local_cluster", "prompt_id", "read_prompts",
    "resolve_layers", "run_sweep", "stable_rank_long", "summarize_sweep",
]
