"""The `lllm sweep` command."""

from __future__ import annotations

import argparse
import sys
import time


from lllm.defaults import DEFAULT_MODEL, DTYPES
from lllm.errors import SweepError
from lllm.kernel.layers import COMPONENTS, METHODS

from lllm.apps.sweep.parts import PartStore
from lllm.apps.sweep.engines import DEFAULT_LOADER, ENGINES, FAST, run_sweep
from lllm.apps.sweep.results import summarize_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lllm sweep`."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, hub id, local dir or GGUF")
    parser.add_argument("--prompts", metavar="FILE", help="one prompt a line, #-comments (default: the bundled set)")
    parser.add_argument("--out", required=True, help="result Parquet file; committed parts go to OUT.parts/")
    parser.add_argument("--engine", choices=ENGINES, default="local")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes of the LocalCluster")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler instead of a LocalCluster")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per task and per committed part file")
    parser.add_argument("--layers", default="all",
                        help="cumulative Jacobians of: all | none | every:K | 0,5,-1 (default: all)")
    parser.add_argument("--components", default=",".join(COMPONENTS), help="of layer,attn,mlp")
    parser.add_argument("--method", choices=METHODS, default="auto", help="of the cumulative Jacobians")
    parser.add_argument("--fast", action="store_true",
                        help="--layers every:3 --components layer --method reverse: cheaper than the default "
                        "from about 9 tokens on")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process; 1 keeps rows identical across engines")
    parser.add_argument("--loader", default=DEFAULT_LOADER, help="module:function returning (model, tokenizer)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="compute again the prompts whose committed row holds an error")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the sweep and print its headline statistics."""
    analysis = {"layers": args.layers, "components": tuple(c.strip() for c in args.components.split(",") if c.strip()),
                "method": args.method}
    if args.fast:
        if (args.layers, args.components, args.method) != ("all", ",".join(COMPONENTS), "auto"):
            raise SweepError("--fast sets --layers, --components and --method; pass either --fast or those")
        analysis = FAST
    start = time.perf_counter()
    try:
        df = run_sweep(
            args.model, args.prompts, args.out, engine=args.engine, workers=args.workers, scheduler=args.scheduler,
            batch_size=args.batch_size, dtype=args.dtype, threads=args.threads, loader=args.loader,
            progress=not args.no_progress, retry_failed=args.retry_failed, **analysis,
        )
    except KeyboardInterrupt:  # Ctrl-C: what is committed stays; say how to go on rather than print a traceback
        store = PartStore(args.out)
        print(f"\nlllm sweep: interrupted; {len(store.read())} prompts are committed in {store.dir}. "
              f"The same command computes only the rest.", file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention
    summary = summarize_sweep(df)
    last_run = PartStore(args.out).runs()[-1]
    print(f"{summary['n_prompts']} prompts ({last_run['computed']} computed now, {last_run['already_done']} "
          f"already done), {summary['n_failed']} failed; {time.perf_counter() - start:.1f} s → {args.out}")
    if summary["n_failed"]:
        print(f"{summary['n_failed']} prompts failed (the error column says why); once the cause is fixed, "
              "--retry-failed computes them again")
    if summary["median_reconstruction_error"] is not None:
        print(f"median reconstruction error {summary['median_reconstruction_error']:.3e}; "
              f"top U decodes to the prediction in {summary['u1_match_rate']:.0%}")
    for comp, stats in summary["depth_vs_stable_rank"].items():
        print(f"{comp:>5}: Spearman ρ(layer, stable rank) = {stats['spearman_rho']:+.2f}")
    return 0
