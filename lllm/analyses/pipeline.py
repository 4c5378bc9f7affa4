"""The one per-prompt pipeline: `analyze` (every figure's data, cached by `cached_analyze`) and `prompt_row` (a sweep's
row), computed by the same functions.

One call gives every number the figures and tables read for one (model, prompt): the final J⁺
and its reconstruction (Fig 3), the ordinary Jacobian's reconstruction (Fig 3), per-token SVDs
with decodings and row/column features (Fig 4, 5), cumulative and layer-wise Jacobians of every
layer/attention/MLP output with their stable ranks, and the layer output's spectra, decoded top singular
vectors and projections (Fig 6, Tables 1–3). Results go through the content-addressed cache (`lllm.io.store`),
so notebooks and the book driver recompute nothing that is unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lllm.analyses import decompose as dec
from lllm.kernel.jacobian import (
    JacobianResult, available_memory, check_fits, default_chunk_size, detached_jacobian, embed, jvp_reconstruction,
    relative_error, text_config, tokenize,
)
from lllm.analyses.generation import top_next_tokens
from lllm.kernel.heap import retained_heap
from lllm.kernel.layers import (
    COMPONENTS, METHODS, LayerJacobians, cumulative_jacobians, final_from_cumulative, layer_jacobians,
)
from lllm.io.codecs import computation_fields, record_to_result, result_to_record
from lllm.io.store import ResultCache
from lllm.validation import check_choice, check_components, check_layers

ANALYSIS_KIND = "analysis"
# Part of the cache key: bumped when what an analysis holds changes (2: next tokens from the model's own logits;
# 3: stable ranks from ‖J‖²_F and σ_max, stored in meta; 4: each layer's right singular vectors decoded in
# layer_decodings, the "Input" of Tables 1–3; 5: spectra and vectors of the cumulative layer output only, stable
# ranks from a Rayleigh quotient).
ANALYSIS_FORMAT = 5


@dataclass
class PromptAnalysis:
    """Everything the paper's figures read for one prompt. Tensors are CPU; metadata is JSON-able."""

    final: JacobianResult  # J⁺ (d, T, d) of the output embedding, with x, y, c
    ordinary_reconstruction: torch.Tensor  # (d,): Σᵢ Jᵢxᵢ of the ordinary Jacobian (one JVP)
    token_spectra: torch.Tensor  # (T, d): singular values of every J⁺ᵢ
    # "layer" -> (L, d): spectra of the cumulative [J⁺ℓ,₀ … J⁺ℓ,T] of the layer output (the one Fig 6A draws)
    layer_spectra: dict[str, torch.Tensor]
    layer_top_u: dict[str, torch.Tensor]  # "layer" -> (L, d, k): its top-k left singular vectors (oriented by y)
    meta: dict = field(default_factory=dict)  # tokens, next tokens, decodings, errors, stable ranks, timings

    @property
    def layers(self) -> list[int]:
        return self.meta["layers"]

    def stable_ranks(self, kind: str = "cumulative") -> dict[str, list[float]]:
        """component -> stable rank per layer, of the cumulative or layer-wise transforms (`layer_stable_ranks`)."""
        return self.meta["stable_ranks"][kind]

    def projections(self, k: int = 2) -> torch.Tensor:
        """(L, k, k): each layer's top-k left singular vectors projected on the last layer's (Fig 6B)."""
        top = self.layer_top_u["layer"][:, :, :k]  # (L, d, k)
        return torch.einsum("ldk,dj->lkj", top, top[-1])


def _reduce(jacobians: LayerJacobians, components, k: int, reference: torch.Tensor | None) -> dict:
    """What the figures read of a group of layer Jacobians: every component's stable ranks (Fig 6C/D) and
    reconstruction errors; with a reference (cumulative maps, oriented by y) the layer output's spectra (L, d)
    (Fig 6A), top-k left singular vectors (L, d, k) (Fig 6B, Tables 1–3) and top-k right ones (L, k, T·d). No
    figure draws another spectrum, so none is computed."""
    out: dict[str, dict] = {"spectra": {}, "top_u": {}, "top_v": {}, "stable_ranks": {}, "errors": {}}
    for comp in components:
        jac = jacobians.jacobian[comp]  # (L, d_out, T, d_in)
        out["stable_ranks"][comp] = dec.stable_ranks_wide(jac.reshape(*jac.shape[:2], -1))  # = layer_stable_ranks
        out["errors"][comp] = jacobians.relative_errors(comp)
        if reference is None or comp != "layer":
            continue
        summaries = [dec.left_spectrum(jacobians.combined(comp, ell), k, reference=reference)
                     for ell in jacobians.layers]
        out["spectra"][comp] = torch.stack([S for S, _ in summaries])
        out["top_u"][comp] = torch.stack([U for _, U in summaries])
        # Tables 1–3 decode the right vectors too: vⱼ = Aᵀuⱼ/σⱼ; σⱼ = 0 (a map of rank below k) has no right
        # vector: it stays zero rather than 0/0
        out["top_v"][comp] = torch.stack([(U.mT @ jacobians.combined(comp, ell))
                                          / S[:U.shape[1], None].clamp_min(torch.finfo(S.dtype).tiny)
                                          for ell, (S, U) in zip(jacobians.layers, summaries)])  # (L, k, T·d)
    return out


def _concatenate(parts: list[dict]) -> dict:
    """The reductions of consecutive groups as one: tensors concatenated along layers, lists joined."""
    joined: dict[str, dict] = {}
    for name in parts[0]:
        joined[name] = {}
        for comp in parts[0][name]:
            values = [part[name][comp] for part in parts]
            joined[name][comp] = torch.cat(values) if isinstance(values[0], torch.Tensor) else sum(values, [])
    return joined


def layer_groups(model: nn.Module, n_tokens: int, layers: Sequence[int], components: Sequence[str],
                 memory_budget: int | None = None) -> list[list[int]]:
    """`layers` cut into consecutive groups whose Jacobians (one (d, T, d) per layer, component and kind: cumulative
    and layer-wise are computed together) fit in `memory_budget` bytes (default: a third of the free memory), at
    least one layer each."""
    cfg = text_config(model)
    per_layer = 2 * len(components) * cfg.hidden_size ** 2 * n_tokens * (torch.finfo(model.dtype).bits // 8)
    budget = available_memory(model.device) // 3 if memory_budget is None else memory_budget
    size = max(1, budget // per_layer)
    return [list(layers[i:i + size]) for i in range(0, len(layers), size)]


@retained_heap()  # its thousands of large temporaries reuse freed memory instead of faulting it back in
def analyze(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    components: Sequence[str] = COMPONENTS,
    method: str = "auto",
    k_vectors: int = 3,
    k_tokens: int = 5,
    progress: bool = True,
    memory_budget: int | None = None,
) -> PromptAnalysis:
    """Every figure's data for one prompt (see the module docstring). Not cached: see `cached_analyze`.

    The layer Jacobians are reduced to what the figures read (spectra, stable ranks, top singular vectors, errors)
    group by group, each group as many layers as fit in `memory_budget` bytes (default: a third of the free
    memory), so that a paper-size model needs the memory of one layer's Jacobians, not of all of them.
    """
    layers, components = check_analysis_options(model, layers, components, method)  # before any work
    timings: dict[str, float] = {"layer_jacobians": 0.0, "svds": 0.0}
    token_ids = tokenize(tokenizer, prompt)
    groups = layer_groups(model, len(token_ids), layers, components, memory_budget)
    parts: dict[str, list[dict]] = {"cumulative": [], "layerwise": []}
    methods: dict[str, set] = {"cumulative": set(), "layerwise": set()}
    final = None
    for group in reversed(groups):  # the last group first: it holds the final J⁺, whose y orients the vectors
        clock = time.perf_counter()
        both = layer_jacobians(model, tokenizer, token_ids, layers=group, components=components, method=method,
                               progress=progress)  # one recorded forward, its composed MLPs shared
        timings["layer_jacobians"] += time.perf_counter() - clock
        for kind in ("cumulative", "layerwise"):
            jacobians = both.pop(kind)
            if final is None:
                clock = time.perf_counter()
                final, _ = final_jacobian(model, tokenizer, token_ids, jacobians, progress=progress)
                timings["final_jacobian"] = time.perf_counter() - clock
            clock = time.perf_counter()
            reference = final.output if kind == "cumulative" else None
            parts[kind].insert(0, _reduce(jacobians, components, k_vectors, reference))
            methods[kind].add(jacobians.method)
            timings["svds"] += time.perf_counter() - clock
            del jacobians  # before the next group: only the reductions are kept
    reduced = {kind: _concatenate(found) for kind, found in parts.items()}
    layer_spectra, layer_top_u = reduced["cumulative"]["spectra"], reduced["cumulative"]["top_u"]

    clock = time.perf_counter()
    x = embed(model, token_ids)
    ordinary = jvp_reconstruction(model, x, detach=False)  # Σ Jᵢxᵢ of the ordinary J, from one JVP
    timings["ordinary_reconstruction"] = time.perf_counter() - clock

    clock = time.perf_counter()
    svds = dec.token_svds(final)
    timings["svds"] += time.perf_counter() - clock

    clock = time.perf_counter()
    last = len(token_ids) - 1
    meta = {
        "prompt": prompt if isinstance(prompt, str) else None,
        "token_ids": token_ids,
        "tokens": final.tokens,
        "layers": layers,
        "components": list(components),
        "next_tokens": top_next_tokens(model, tokenizer, token_ids, k_tokens),
        "relative_error": final.relative_error,
        "ordinary_relative_error": relative_error(final.output, ordinary),
        "bias_fraction": None if final.bias is None else float(final.bias.norm() / final.output.norm()),
        "token_stable_rank": dec.per_token_stable_rank(final).tolist(),
        "stable_ranks": {kind: reduced[kind]["stable_ranks"] for kind in reduced},
        "token_decodings": dec.decode_svds(svds, model, tokenizer, k_vectors, k_tokens),
        "row_col_features": _features(final.block(last), model, tokenizer, k_tokens),
        "layer_errors": {f"{kind}.{c}": reduced[kind]["errors"][c] for kind in reduced for c in components},
        "layer_decodings": _layer_decodings(layer_top_u["layer"], layer_spectra["layer"], model, tokenizer,
                                            k_tokens, reduced["cumulative"]["top_v"].get("layer"), len(token_ids))
        if "layer" in layer_top_u else [],
        "methods": {kind: "+".join(sorted(used)) for kind, used in methods.items()},
        "layer_groups": [list(group) for group in groups],
        "timings": timings,
    }
    timings["decodings"] = time.perf_counter() - clock
    return PromptAnalysis(
        final=final, ordinary_reconstruction=ordinary, token_spectra=torch.stack([s.S for s in svds]),
        layer_spectra=layer_spectra, layer_top_u=layer_top_u, meta=meta,
    )


def final_jacobian(model: nn.Module, tokenizer, token_ids: list[int], cumulative: LayerJacobians | None,
                   progress: bool = False) -> tuple[JacobianResult, str]:
    """(the final J⁺, the method that computed it): the cumulative run's last layer when it is what lm_head reads
    (not computed twice), else its own reverse-mode run."""
    final = None if cumulative is None else final_from_cumulative(model, cumulative)
    if final is not None:
        return final, cumulative.method
    return detached_jacobian(model, tokenizer, token_ids, progress=progress), "reverse"


def layer_stable_ranks(jacobians: LayerJacobians, component: str) -> list[float]:
    """Stable rank of each layer's token-combined map [J⁺ℓ,₀ … J⁺ℓ,T]: (d, T·d) per layer, from ‖J‖²_F and
    σ_max."""
    jac = jacobians.jacobian[component]  # (L, d_out, T, d_in)
    return dec.stable_ranks_wide(jac.reshape(*jac.shape[:2], -1))


@retained_heap()
def prompt_row(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    layers: Sequence[int] | None = None,
    components: Sequence[str] = COMPONENTS,
    method: str = "auto",
    top_k: int = 5,
    u_vectors: int = 3,
) -> dict:
    """The one-line summary of a prompt that `lllm sweep` writes (the "At scale" page): the same quantities as
    `analyze`, by the same functions, without the ones only figures of a single prompt read.

    layers=[] skips the depth profile (the final J⁺ alone). Raises on a prompt that cannot be analyzed.
    """
    n_layers = text_config(model).num_hidden_layers
    layers = [] if layers is not None and len(layers) == 0 else check_layers(layers, n_layers)  # []: final J⁺ only
    components = check_components(components, COMPONENTS)
    check_choice(method, "method", METHODS)
    token_ids = tokenize(tokenizer, prompt)
    d = text_config(model).hidden_size
    dtype = model.get_input_embeddings().weight.dtype
    check_fits(model, len(token_ids), default_chunk_size(model, len(token_ids), dtype), dtype)
    embed(model, token_ids)  # refuses token ids outside the vocabulary with a PromptError
    following = top_next_tokens(model, tokenizer, token_ids, top_k)
    ranks: dict[str, list[float] | None] = {c: None for c in COMPONENTS}
    cumulative, max_error = None, None
    if layers:
        cumulative = cumulative_jacobians(model, tokenizer, token_ids, layers=layers, components=components,
                                          method=method, progress=False)
        for comp in components:
            ranks[comp] = layer_stable_ranks(cumulative, comp)
        max_error = max(max(cumulative.relative_errors(comp)) for comp in components)
    final, final_method = final_jacobian(model, tokenizer, token_ids, cumulative)
    last = dec.svd(final.block(-1), k=min(u_vectors, d), reference=final.output)
    decoded = dec.decode_output(last.U.mT, model, tokenizer, k=1)
    u_ids = [entry.ids[0] for entry in decoded]
    next_ids = [t["id"] for t in following]
    return {
        "n_tokens": len(token_ids),
        "token_ids": token_ids,
        "tokens": final.tokens,
        "next_token_ids": next_ids,
        "next_tokens": [t["token"] for t in following],
        "next_probs": [t["prob"] for t in following],
        "final_method": final_method,
        "reconstruction_error": final.relative_error,
        "stable_rank": dec.stable_ranks_wide(final.combined[None])[0],
        "token_stable_ranks": dec.per_token_stable_rank(final).tolist(),
        "layers": layers,
        **{f"cumulative_stable_rank_{c}": ranks[c] for c in COMPONENTS},
        "cumulative_max_error": max_error,
        "u_token_ids": u_ids,
        "u_tokens": [entry.tokens[0] for entry in decoded],
        "u_singular_values": last.S.tolist(),
        "u1_matches_prediction": u_ids[0] == next_ids[0],
    }


def check_analysis_options(model: nn.Module, layers, components, method: str) -> tuple[list[int], tuple[str, ...]]:
    """(layers, components) checked and normalized (negative layers count from the end); ArgumentError if not."""
    check_choice(method, "method", METHODS)
    return check_layers(layers, text_config(model).num_hidden_layers), check_components(components, COMPONENTS)


def _features(block: torch.Tensor, model, tokenizer, k_tokens: int) -> dict:
    """Fig 4A for one block: decoded largest rows/columns and the norm distributions (JSON-able)."""
    features = dec.row_col_features(block, model, tokenizer, n_features=10, k_tokens=k_tokens)
    return {
        "rows": features.rows, "row_tokens": [d.to_dict() for d in features.row_tokens],
        "cols": features.cols, "col_tokens": [d.to_dict() for d in features.col_tokens],
        "row_norms": features.row_norms.tolist(), "col_norms": features.col_norms.tolist(),
    }


def _layer_decodings(top_u: torch.Tensor, spectra: torch.Tensor, model, tokenizer, k_tokens: int,
                     top_v: torch.Tensor | None = None, n_tokens: int = 1) -> list[list[dict]]:
    """Per layer, its top left singular vectors decoded through lm_head (the "Output" of Tables 1–3): (L × k) dicts;
    with top_v (L, k, T·d) each also gets "v", its right singular vector (the tables' "Input") decoded by cosine
    with the input embeddings at the token where it weighs most ("token", its "share" of |v|²). Every layer's
    vectors go through one product (each reads the whole vocabulary matrix)."""
    n_layers, d, k = top_u.shape  # each u already through the final norm
    decoded = dec.decode_output(top_u.mT.reshape(n_layers * k, d), model, tokenizer, k_tokens)
    table = [[{"singular_value": float(s[i]), **decoded[ell * k + i].to_dict()} for i in range(k)]
             for ell, s in enumerate(spectra)]
    if top_v is None:
        return table
    v = top_v.reshape(n_layers, k, n_tokens, -1)  # (L, k, T, d_in): each vector's part per input token
    shares = v.double().square().sum(dim=-1)  # (L, k, T)
    where = shares.argmax(dim=2)  # (L, k)
    live = [(ell, j) for ell in range(n_layers) for j in range(k) if shares[ell, j].sum() > 0]  # σⱼ = 0: no vector
    inputs = dec.decode_input(torch.stack([v[ell, j, where[ell, j]] for ell, j in live]), model, tokenizer,
                              k_tokens) if live else []
    for entries in table:
        for entry in entries:
            entry["v"] = None
    for (ell, j), found in zip(live, inputs):
        at = int(where[ell, j])
        share = float(shares[ell, j, at] / shares[ell, j].sum())
        table[ell][j]["v"] = {**found.to_dict(), "token": at, "share": share}
    return table


# ---------------------------------------------------------------------------------------------
# Persistence and cache
# ---------------------------------------------------------------------------------------------


def analysis_to_record(analysis: PromptAnalysis, model: nn.Module, options: dict) -> tuple[dict, dict]:
    """(tensors, meta) for lllm.io.store: the final J⁺ record plus every spectrum and vector."""
    tensors, meta = result_to_record(analysis.final, model=model, prompt=analysis.meta["prompt"], options=options)
    tensors = dict(tensors)
    tensors["ordinary_reconstruction"] = analysis.ordinary_reconstruction
    tensors["token_spectra"] = analysis.token_spectra
    for comp in analysis.layer_spectra:
        tensors[f"layer_spectra.{comp}"] = analysis.layer_spectra[comp]
        tensors[f"layer_top_u.{comp}"] = analysis.layer_top_u[comp]
    return tensors, {**meta, "analysis": analysis.meta}


def record_to_analysis(tensors: dict, meta: dict) -> PromptAnalysis:
    """The PromptAnalysis that analysis_to_record stored."""
    info = meta["analysis"]
    pick = lambda prefix: {c: tensors[f"{prefix}.{c}"] for c in info["components"]  # noqa: E731
                           if f"{prefix}.{c}" in tensors}
    return PromptAnalysis(
        final=record_to_result(tensors, meta), ordinary_reconstruction=tensors["ordinary_reconstruction"],
        token_spectra=tensors["token_spectra"], layer_spectra=pick("layer_spectra"),
        layer_top_u=pick("layer_top_u"), meta=info,
    )


def cached_analyze(model: nn.Module, tokenizer, prompt, *, cache: ResultCache | None = None,
                   **options) -> PromptAnalysis:
    """`analyze` through the content-addressed results cache: an unchanged call loads instead."""
    cache = cache or ResultCache()
    layers, components = check_analysis_options(model, options.get("layers"), options.get("components", COMPONENTS),
                                                options.get("method", "auto"))
    all_layers = layers == list(range(text_config(model).num_hidden_layers))
    options = {**options, "layers": None if all_layers else layers}
    if "components" in options:
        options["components"] = list(components)
    # neither the progress bars nor the memory budget (how many layers are reduced at once) change what is computed
    stored = {k: v for k, v in options.items() if k not in ("progress", "memory_budget")}
    key = computation_fields(model, prompt, options={**stored, "format": ANALYSIS_FORMAT})  # the one key builder
    tensors, meta, _ = cache.get_or_compute(
        ANALYSIS_KIND, key, lambda: analysis_to_record(analyze(model, tokenizer, prompt, **options), model, stored)
    )
    return record_to_analysis(tensors, meta)


def write_summary(analysis: PromptAnalysis, path: Path) -> None:
    """A human-readable summary.json of the analysis (everything but the tensors)."""
    summary = {**analysis.meta, "stable_rank": analysis.stable_ranks("cumulative"),
               "layerwise_stable_rank": analysis.stable_ranks("layerwise"),
               "projections": analysis.projections().tolist()}
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
