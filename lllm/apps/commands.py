"""`lllm jacobian`: the detached Jacobian of one prompt, summarized on the terminal and optionally saved."""

from __future__ import annotations

import argparse
import time

from lllm.io.models import DTYPES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --prompt and --dtype, shared by the one-prompt commands."""
    parser.add_argument("--model", default="smollm2-135m", help="embedded short name, hub id, local dir or GGUF")
    parser.add_argument("--prompt", default="The bridge out of Marin is the")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="where the model and every Jacobian live: cpu, cuda, cuda:1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lllm jacobian`."""
    add_model_arguments(parser)
    parser.add_argument("--top", type=int, default=5, help="how many next tokens to print")
    parser.add_argument("--chunk-size", type=int, default=None, help="output rows per batched backward")
    parser.add_argument("--mlp-split", choices=("activation", "gate"), default="activation")
    parser.add_argument("--save", metavar="DIR", help="write the result as tensors.safetensors + meta.json")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Compute, print and optionally save the detached Jacobian of one prompt."""
    from . import load
    from lllm.analyses.decompose import per_token_stable_rank
    from lllm.analyses.generation import top_next_tokens
    from lllm.kernel.jacobian import detached_jacobian
    from lllm.io.models import check_device
    from lllm.io.store import check_entry_target, result_to_record, save_result
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
