"""The detached Jacobian of a concept prompt as a steering operator (paper §3.6, eq. 16, Table 4).

    f_L(x) = λ · f_L(x_new) + (1 − λ) · (J⁺_L(x_steer) · x_new + c_L)

f_L is the output of decoder layer L (``decoder.layers[L]``, 0-based, residual stream, *without*
the final norm): an intermediate activation that continues through layers L+1… . J⁺_L(x_steer)
is the cumulative detached Jacobian from the concept's input embeddings (T_c, d) to that output at
*every* concept position: a block lower-triangular (T_c·d × T_c·d) map (causal attention), so that
f_L(x_steer) = J⁺_L x_steer + c_L row by row. c_L is the image of the biases (Qwen 2's v bias; zero
for bias-free models). Eq. 16 as printed has no c_L; we keep it, because without it the operator is
not the concept's map (on Qwen 2.5 c is most of the output), and λ = 0 on the concept prompt itself
would not give back f_L(x_steer). λ = 1 leaves the model untouched, bit for bit.

Alignment of concept positions with the new sequence (a choice eq. 16 leaves open):
- right-aligned: the last min(T, T_c) positions of the current sequence are mapped to the concept's
  last positions, last with last. The last row is the one that predicts the next token, and the
  concept's last row is the map that produced the concept's own prediction ("… the Golden" →
  " Gate"), so every prediction is steered by it. Because J⁺_L is block lower-triangular, each
  steered row still only sees inputs at or before it.
- rows before that window (a new sequence longer than the concept) receive no steering term and
  keep f_L(x_new): mixing them with a zero term would scale them by λ, which damps rather than steers.
- a new sequence shorter than the concept feeds zero input to the concept's first positions (they
  contribute nothing to the linear term).
- during generation the window slides: each step recomputes f_L for the grown sequence (no KV cache)
  and applies the operator to its last min(T, T_c) input embeddings, generated tokens included.

J⁺_L is held as the concept's frozen factors (recorded once, on one detached forward), and applied
matrix-free: with those factors replayed, layers 0…L are exactly the affine map x ↦ J⁺_L x + c_L, so
one forward of the T_c-token window gives J⁺_L x_new + c_L without forming the matrix. `jacobian()`
materializes the matrix (T_c·d forward columns); the tests check that both agree, and that it
reconstructs f_L(x_steer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lllm.errors import ArgumentError, LLLMError, PromptError, ReplayError, UnsupportedModelError
from lllm.analyses.generation import check_length, next_token_logits
from lllm.kernel.jacobian import embed, relative_error, self_check, text_config, tokenize
from lllm.kernel.parts import decoder_parts
from lllm.kernel.tracing import (
    LayerTrace, causal_basis, check_result_fits, has_biases, sweep_chunk_size, without_biases,
)
from lllm.kernel.oplevel import Recording, detached
from lllm.validation import check_chunk_size, grad_enabled

DEFAULT_LAMS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)


def default_layer(model: nn.Module) -> int:
    """round(2/3 · n_layers), the paper's intervention depth (24/36, 33/48), as a 0-based layer index."""
    n_layers = text_config(model).num_hidden_layers
    return min(n_layers - 1, round(2 * n_layers / 3))


def _resolve_layer(model: nn.Module, layer: int | None) -> int:
    n_layers = text_config(model).num_hidden_layers
    if layer is None:
        return default_layer(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise ArgumentError(f"layer must be an integer in [-{n_layers}, {n_layers}) for this {n_layers}-layer model, "
                        f"got {layer!r}")
    return layer % n_layers


def _layer_output(model: nn.Module, layer: int, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """f_L: (B, T, d), the output of decoder layer `layer` for inputs_embeds (B, T, d); later layers are skipped."""
    with LayerTrace(decoder_parts(model), [layer], ("layer",), stop=True) as trace:
        model.get_decoder()(inputs_embeds=inputs_embeds, use_cache=False)
    return trace.outputs[(layer, "layer")]


@dataclass
class SteeringOperator:
    """J⁺_L(x_steer) (+ c_L) of a concept prompt at layer L, held as its recorded frozen factors."""

    model: nn.Module
    layer: int
    token_ids: list[int]
    tokens: list[str]
    inputs: torch.Tensor  # (T_c, d): x_steer, the concept's input embeddings
    output: torch.Tensor  # (T_c, d): f_L(x_steer) from the detached forward (= J⁺_L x_steer + c_L)
    bias: torch.Tensor | None  # (T_c, d): c_L, the image of the biases; None for bias-free models
    mlp_split: str = "activation"
    recording: Recording | None = field(default=None, repr=False)  # frozen at x_steer, layers ≤ L

    @property
    def n_tokens(self) -> int:
        """T_c, the concept's length."""
        return len(self.token_ids)

    def _replay(self, inputs_embeds: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The concept's affine layer-L map on its tokens start…T_c-1, applied to a batch (B, T_c - start, d)."""
        try:
            return self._replayed(inputs_embeds, start)
        except ReplayError as error:
            raise UnsupportedModelError(f"the concept's recorded map cannot be applied here: {error}") from error

    def _replayed(self, inputs_embeds: torch.Tensor, start: int) -> torch.Tensor:
        with detached(self.model, mlp_split=self.mlp_split) as lin, torch.no_grad():
            lin.load(self.recording)
            if inputs_embeds.shape[0] > 1 and not lin.batch_safe:
                raise UnsupportedModelError("this model selects rows by x-dependent indices (MoE routing): its concept "
                                            "map can be applied to one input at a time, not to a batch")
            lin.mark_live(inputs_embeds)
            with lin.replay(start, self.n_tokens):
                return _layer_output(self.model, self.layer, inputs_embeds)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """J⁺_L x + c_L for the last W = min(T, T_c) rows of inputs x: (T, d), right-aligned: (W, d)."""
        return self.apply_rows(x[None])[0]

    def apply_rows(self, xs: torch.Tensor) -> torch.Tensor:
        """`apply` to each of a batch of inputs xs: (B, T, d) -> (B, W, d), in one replay where the recording
        allows a batch (else one replay each)."""
        n_new, n_concept = xs.shape[1], self.n_tokens
        width = min(n_new, n_concept)
        windows = xs.new_zeros(xs.shape[0], n_concept, xs.shape[2])  # positions with no new input contribute nothing
        windows[:, n_concept - width :] = xs[:, n_new - width :]
        if xs.shape[0] > 1 and not self.recording.batch_safe:
            return torch.cat([self._replay(window[None]) for window in windows])[:, n_concept - width :]
        return self._replay(windows)[:, n_concept - width :]

    def jacobian(self, chunk_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """The materialized J⁺_L: (T_c, d_out, T_c, d_in), J[p, :, q, :] = ∂f_L[p] / ∂x_q (zero for q > p)."""
        n, d = self.inputs.shape
        check_result_fits(n, d, n, d, self.inputs.dtype, self.inputs.device)
        chunk_size = check_chunk_size(chunk_size) or sweep_chunk_size(self.model, n, self.inputs.dtype)
        jac = torch.zeros(n, d, n, d, dtype=self.inputs.dtype, device=self.inputs.device)
        chunks = list(causal_basis(n - 1, d, chunk_size, self.inputs.dtype, self.inputs.device))
        with without_biases(self.model):  # columns J⁺_L e directly, not (J⁺_L e + c_L) − c_L
            for i, ks, basis in tqdm(chunks, desc="concept J⁺_L columns", disable=not progress, leave=False):
                jac[i:, :, i, ks] = self._replay(basis, start=i).permute(1, 2, 0)  # (T_c - i, d, B)
        rebuilt = torch.einsum("potd,td->po", jac, self.inputs) + (0 if self.bias is None else self.bias)
        self_check(relative_error(self.output, rebuilt), self.inputs.dtype, "the concept's materialized J⁺_L")
        return jac


@grad_enabled
def concept_operator(
    model: nn.Module, tokenizer, concept: str | Sequence[int] | torch.Tensor, *, layer: int | None = None,
    mlp_split: str = "activation",
) -> SteeringOperator:
    """Record J⁺_L of the concept prompt at layer L (default round(2/3 · n_layers)): one detached forward."""
    layer = _resolve_layer(model, layer)
    token_ids = tokenize(tokenizer, concept)
    x = embed(model, token_ids)  # (T_c, d)
    with detached(model, mlp_split=mlp_split) as lin:
        live = x.clone().requires_grad_(True)  # recorded with grad: an x-dependent tensor the mode missed is refused
        with lin.recording(), torch.enable_grad():
            output = _layer_output(model, layer, live[None].clone())
        lin.check_linear(output, f"the output of layer {layer}")
        lin.finish_record([output])
        with lin.replay(), torch.no_grad():  # the affine map at x = 0: c_L, independently of the output
            bias = _layer_output(model, layer, torch.zeros_like(x)[None])[0] if has_biases(model) else None
        recording = lin.recorded()
    tokens = [tokenizer.decode([i]) for i in token_ids]
    operator = SteeringOperator(model=model, layer=layer, token_ids=token_ids, tokens=tokens, inputs=x,
                                output=output[0].detach(), bias=bias, mlp_split=mlp_split, recording=recording)
    # the replayed map must give back the recorded output: J⁺_L x_steer + c_L = f_L(x_steer)
    self_check(relative_error(operator.output, operator.apply(x)), x.dtype, f"the concept's layer-{layer} map")
    return operator


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ArgumentError(f"λ (lam) must be a finite number (1 leaves the model untouched, 0 is the operator "
                        f"alone), got {lam!r}")
    return float(lam)


@contextmanager
def _mixed_layer(operator: SteeringOperator, steer_rows: torch.Tensor, lams: Sequence[float]) -> Iterator[None]:
    """Inside: decoder layer L's output (B, T, d) has the last W rows of each batch row b replaced by
    λ_b·f_L + (1 − λ_b)·steer_rows[b], for steer_rows (B, W, d) and one λ per batch row."""
    width = steer_rows.shape[-2]
    lam = torch.tensor(lams, dtype=torch.float64, device=steer_rows.device)  # (B,)

    def hook(module: nn.Module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        mixed = hidden.clone()
        # λ's arithmetic as for a Python float: each product in the precision PyTorch computes a scalar product in
        # (float32 below float64), rounded to the model's dtype, then the sum in that dtype
        wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        keep, mix = (factor.to(wide)[:, None, None] for factor in (lam, 1.0 - lam))  # (B, 1, 1)
        mixed[:, -width:] = ((keep * hidden[:, -width:].to(wide)).to(hidden.dtype)
                             + (mix * steer_rows.to(wide)).to(hidden.dtype))
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    handle = operator.model.get_decoder().layers[operator.layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def steered_activation(operator: SteeringOperator, ids: Sequence[int], lam: float) -> torch.Tensor:
    """Eq. 16's layer-L activation for ids: (T, d), as the remaining layers receive it."""
    lam = _check_lam(lam)
    x = embed(operator.model, ids)
    with _mixed_layer(operator, operator.apply(x)[None], [lam]), torch.no_grad():
        return _layer_output(operator.model, operator.layer, x[None])[0]


def steered_logits(operator: SteeringOperator, ids: Sequence[int], lam: float) -> torch.Tensor:
    """Next-token logits (vocab,) after ids with eq. 16 applied at layer L."""
    lam = _check_lam(lam)
    steer_rows = operator.apply(embed(operator.model, ids))  # before the forward: the replay is a forward too
    with _mixed_layer(operator, steer_rows[None], [lam]):
        return next_token_logits(operator.model, ids)


def steered_continuation(operator: SteeringOperator, ids: Sequence[int], lam: float, n_tokens: int) -> list[int]:
    """n_tokens greedy token ids after ids, with eq. 16 applied at every step to the grown sequence."""
    return steered_continuations(operator, ids, [lam], n_tokens)[0]


def steered_continuations(operator: SteeringOperator, ids: Sequence[int], lams: Sequence[float | None],
                          n_tokens: int) -> list[list[int]]:
    """`steered_continuation` for every λ of lams (None: the model's own, unsteered), decoded together: all have
    the same length at every step, so one batched forward serves them all. Greedy decoding on a CPU is bound by
    reading the weights, once per forward: a batch of seven costs about what one continuation did."""
    model, ids = operator.model, list(ids)
    if not ids:
        raise PromptError("steering needs at least one prompt token to continue")
    check_length(model, len(ids), n_tokens)  # before any work
    embed(model, ids)  # refuses ids outside the vocabulary with a PromptError
    steered = torch.tensor([lam is not None for lam in lams], device=model.device)[:, None, None]  # (B, 1, 1)
    weights = [1.0 if lam is None else _check_lam(lam) for lam in lams]
    sequences = [list(ids) for _ in lams]
    for _ in range(n_tokens):
        batch = torch.tensor(sequences, device=model.device)  # (B, T): every row as long as the others
        with torch.no_grad():
            x = model.get_input_embeddings()(batch)  # (B, T, d), as `embed` gives each row
            # an unsteered row mixes with λ = 1 and zero rows: 1·f_L + 0·0, f_L itself bit for bit
            steer_rows = torch.where(steered, operator.apply_rows(x), 0.0)
            with _mixed_layer(operator, steer_rows, weights):
                logits = model(input_ids=batch, use_cache=False, logits_to_keep=1).logits[:, -1]  # (B, vocab)
        for sequence, token in zip(sequences, logits.argmax(dim=-1).tolist()):
            sequence.append(int(token))
    return [sequence[len(ids):] for sequence in sequences]


@dataclass
class SteeringResult:
    """Normal and steered greedy continuations of one prompt, for one λ."""

    concept: str
    prompt: str
    layer: int
    lam: float
    prompt_ids: list[int]
    normal_ids: list[int]
    steered_ids: list[int]
    normal_text: str  # the prompt and its normal continuation, decoded together
    steered_text: str  # the prompt and its steered continuation
    normal_continuation: str = ""  # only the generated tokens, as they read after the decoded prompt
    steered_continuation: str = ""

    @property
    def changed(self) -> bool:
        """Whether steering changed any generated token."""
        return self.normal_ids != self.steered_ids


def continuation_text(tokenizer, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
    """The generated tokens as they read after the prompt: the decoded whole minus the decoded prompt ids (which hold
    what the tokenizer added, a <bos> for one, so slicing by the prompt string's length would cut the wrong place)."""
    head, whole = tokenizer.decode(list(prompt_ids)), tokenizer.decode(list(prompt_ids) + list(generated))
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(list(generated))


def lambda_sweep(
    model: nn.Module,
    tokenizer,
    concept: str | Sequence[int] | torch.Tensor,
    prompt: str | Sequence[int] | torch.Tensor,
    lams: Sequence[float] = DEFAULT_LAMS,
    *,
    layer: int | None = None,
    n_tokens: int = 8,
    mlp_split: str = "activation",
) -> list[SteeringResult]:
    """steer() for every λ in lams, with J⁺_L of the concept recorded once and every continuation decoded in one
    batch (`steered_continuations`)."""
    lams = [_check_lam(lam) for lam in lams]
    operator = concept_operator(model, tokenizer, concept, layer=layer, mlp_split=mlp_split)
    prompt_ids = tokenize(tokenizer, prompt)
    normal, *continuations = steered_continuations(operator, prompt_ids, [None, *lams], n_tokens)
    concept_text = concept if isinstance(concept, str) else tokenizer.decode(operator.token_ids)
    prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)
    results = []
    for lam, steered in zip(lams, continuations):
        results.append(SteeringResult(
            concept=concept_text, prompt=prompt_text, layer=operator.layer, lam=lam, prompt_ids=prompt_ids,
            normal_ids=normal, steered_ids=steered, normal_text=tokenizer.decode(prompt_ids + normal),
            steered_text=tokenizer.decode(prompt_ids + steered),
            normal_continuation=continuation_text(tokenizer, prompt_ids, normal),
            steered_continuation=continuation_text(tokenizer, prompt_ids, steered),
        ))
    return results


def steer(
    model: nn.Module,
    tokenizer,
    concept: str | Sequence[int] | torch.Tensor,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    lam: float,
    layer: int | None = None,
    n_tokens: int = 8,
    mlp_split: str = "activation",
) -> SteeringResult:
    """Greedy continuation of prompt, normal and steered by the concept's J⁺_L with weight λ (eq. 16)."""
    (result,) = lambda_sweep(model, tokenizer, concept, prompt, (lam,), layer=layer, n_tokens=n_tokens,
                             mlp_split=mlp_split)
    return result


def sweep_table(results: Sequence[SteeringResult]) -> str:
    """A markdown table of a λ sweep: the normal continuation, then one row per λ."""
    if not results:
        raise LLLMError("no steering results to tabulate")
    first = results[0]
    cell = lambda text: text.replace("|", "\\|").replace("\n", "⏎")  # noqa: E731
    rows = [f"concept {first.concept!r}, layer {first.layer}, prompt {first.prompt!r}", "",
            "| λ | continuation |", "|---|---|", f"| normal | {cell(first.normal_text)} |"]
    rows += [f"| {r.lam:g} | {cell(r.steered_text)} |" for r in results]
    return "\n".join(rows)
