"""The one-prompt commands: `lllm jacobian` (the detached Jacobian, summarized and optionally saved) and
`lllm analyze` (the whole per-prompt analysis, written to a directory)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lllm.defaults import DEFAULT_MODEL, DEFAULT_PROMPT, DTYPES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --prompt and --dtype, shared by the one-prompt commands."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, hub id, local dir or GGUF")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="where the model and every Jacobian live: cpu, cuda, cuda:1")


def add_jacobian_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lllm jacobian`."""
    add_model_arguments(parser)
    parser.add_argument("--top", type=int, default=5, help="how many next tokens to print")
    parser.add_argument("--chunk-size", type=int, default=None, help="output rows per batched backward")
    parser.add_argument("--mlp-split", choices=("activation", "gate"), default="activation")
    parser.add_argument("--save", metavar="DIR", help="write the result as tensors.safetensors + meta.json")
    parser.add_argument("--no-progress", action="store_true")


def run_jacobian(args: argparse.Namespace) -> int:
    """Compute, print and optionally save the detached Jacobian of one prompt."""
    from lllm import load
    from lllm.analyses.decompose import per_token_stable_rank
    from lllm.analyses.generation import top_next_tokens
    from lllm.kernel.jacobian import detached_jacobian
    from lllm.io.models import check_device
    from lllm.io.codecs import result_to_record
    from lllm.io.store import check_entry_target, save_result
    from lllm.validation import check_chunk_size, check_int, check_prompt_text, writable_directory

    check_chunk_size(args.chunk_size)
    check_int(args.top, "--top", minimum=1)
    check_prompt_text(args.prompt)
    check_device(args.device)
    save = None if args.save is None else writable_directory(args.save, "--save")  # before any work
    if save is not None:
        check_entry_target(save, "--save")
    start = time.perf_counter()
    model, tokenizer = load(args.model, dtype=DTYPES[args.dtype], device=args.device)
    loaded = time.perf_counter() - start
    result = detached_jacobian(
        model, tokenizer, args.prompt, chunk_size=args.chunk_size, mlp_split=args.mlp_split,
        progress=not args.no_progress,
    )
    print(f"model      {args.model} ({args.dtype}), loaded in {loaded:.1f} s")
    print(f"tokens     {result.tokens}")
    following = top_next_tokens(model, tokenizer, result.token_ids, args.top)
    print("next       " + "  ".join(f"{t['token']!r} {t['prob']:.3f}" for t in following))
    bias = "" if result.bias is None else f"  (affine: |c|/|y| = {float(result.bias.norm() / result.output.norm()):.3f})"
    print(f"error      {result.relative_error:.3e}  std(y − Σ J⁺ᵢxᵢ − c)/std(y){bias}")
    ranks = per_token_stable_rank(result).tolist()
    print("stable rank per token")
    for token, rank in zip(result.tokens, ranks):
        print(f"  {token!r:>16} {rank:8.3f}")
    print(f"J⁺ {tuple(result.jacobian.shape)} in {result.seconds:.2f} s")
    if save is not None:
        options = {"mlp_split": args.mlp_split, "position": -1}
        path = save_result(save, *result_to_record(result, model=model, prompt=args.prompt, options=options))
        print(f"saved      {path}")
    return 0



def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lllm analyze`."""
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for tensors.safetensors, meta.json, summary.json")
    parser.add_argument("--layers", type=int, nargs="*", help="layer indices (default: all)")
    parser.add_argument("--method", choices=("auto", "forward", "reverse"), default="auto")
    parser.add_argument("--no-cache", action="store_true", help="recompute even if the results cache has it")
    parser.add_argument("--no-progress", action="store_true")


def _is_summary(path: Path) -> bool:
    """Whether path is a summary.json that write_summary wrote (so that replacing it loses nothing)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"relative_error", "stable_rank", "token_ids"} <= summary.keys()


def run_analyze(args: argparse.Namespace) -> int:
    """Analyze one prompt, write everything to --out, and print the headline numbers."""
    from lllm import load
    from lllm.analyses.pipeline import (
        analysis_to_record, analyze, cached_analyze, check_analysis_options, write_summary,
    )
    from lllm.kernel.layers import COMPONENTS
    from lllm.errors import OutputPathError
    from lllm.io.models import check_device
    from lllm.io.store import check_entry_target, save_result
    from lllm.validation import check_prompt_text, writable_directory

    check_prompt_text(args.prompt)
    check_device(args.device)
    out = writable_directory(args.out, "--out")  # before the model loads and the analysis runs
    check_entry_target(out / "analysis", "--out")
    summary = out / "analysis-summary.json"
    if summary.exists() and not _is_summary(summary):
        raise OutputPathError(f"{summary} exists and lllm did not write it; give another --out")
    model, tokenizer = load(args.model, dtype=DTYPES[args.dtype], device=args.device)
    check_analysis_options(model, args.layers, COMPONENTS, args.method)
    options = {"layers": args.layers, "method": args.method, "progress": not args.no_progress}
    if args.no_cache:
        options.pop("progress")
        analysis = analyze(model, tokenizer, args.prompt, progress=not args.no_progress, **options)
    else:
        analysis = cached_analyze(model, tokenizer, args.prompt, **options)
    save_result(out / "analysis", *analysis_to_record(analysis, model, {k: v for k, v in options.items()
                                                                        if k != "progress"}))
    write_summary(analysis, out.joinpath("analysis-summary.json"))
    meta = analysis.meta
    print(f"tokens        {meta['tokens']}")
    print("next          " + "  ".join(f"{t['token']!r} {t['prob']:.3f}" for t in meta["next_tokens"]))
    print(f"error         {meta['relative_error']:.3e} (detached)   {meta['ordinary_relative_error']:.3e} (ordinary)")
    last = meta["token_decodings"][-1]
    for entry in last:
        v = entry.get("v") or entry["v_by_token"][-1]
        print(f"σ{entry['index']} {entry['singular_value']:8.3f}  U {entry['u']['tokens'][:3]}  V {v['tokens'][:3]}")
    ranks = analysis.stable_ranks("cumulative")
    print("stable rank per layer (cumulative: layer / attn / mlp)")
    for i, ell in enumerate(analysis.layers):
        print(f"  {ell:3d} " + "  ".join(f"{ranks[c][i]:8.3f}" for c in ranks))
    print(f"wrote         {out}")
    return 0
