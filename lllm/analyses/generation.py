"""Greedy generation, and greedy generation with the detached Jacobian of every prediction (paper Fig. 2).

Fig. 2 generates a few tokens from the BOS token alone and, for every step, shows the J⁺ᵢ blocks
of that step's prediction and their low-rank spectra. `generate_with_jacobians` returns exactly
that: for step s, the detached Jacobian of the output embedding predicted from the ids so far
(prompt + the s tokens already generated), the predicted token, its probability, and optionally
the top-k singular values of each J⁺ᵢ.

`greedy_continuation` is the plain argmax loop (no KV cache: each step recomputes the whole
sequence). Steering (lllm.analyses.steering) decodes the same way, the normal and the steered
continuations in one batch, so that they differ only by its hook on one layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lllm.analyses.decompose import token_svds
from lllm.errors import PromptError
from lllm.kernel.jacobian import JacobianResult, detached_jacobian, tokenize
from lllm.validation import check_int


@dataclass
class GenerationStep:
    """One greedy step: J⁺ of the prediction from the ids so far, and the token it predicts."""

    jacobian: JacobianResult  # J⁺ of the last output embedding w.r.t. the (T, d) inputs of this step
    token_id: int
    token: str
    probability: float  # softmax probability of token_id under the model's own logits
    spectrum: torch.Tensor | None  # (T, k): top-k singular values of each J⁺ᵢ, or None when k was not asked

    @property
    def input_ids(self) -> list[int]:
        """The ids this step predicts from: the prompt and every token generated before it."""
        return self.jacobian.token_ids


@dataclass
class GenerationResult:
    """A greedy continuation with the detached Jacobian of every one of its predictions."""

    prompt_ids: list[int]
    steps: list[GenerationStep]
    text: str  # the prompt and the generated tokens, decoded together
    start: str = ""  # what generation started from, in words ("the BOS token '<bos>'", "the prompt '…'")

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids, in order."""
        return [step.token_id for step in self.steps]

    @property
    def tokens(self) -> list[str]:
        """The generated tokens, each decoded on its own."""
        return [step.token for step in self.steps]

    @property
    def probabilities(self) -> list[float]:
        """The probability of each generated token at its step."""
        return [step.probability for step in self.steps]


def document_start(tokenizer) -> tuple[list[int], str]:
    """The minimal prompt of Fig. 2 and what it is in words: [BOS]; for a tokenizer without one (Qwen 2.5 and 3 have
    `bos_token: null`), its end-of-text token, which ends every pretraining document, so the next one starts there."""
    kinds = (("bos_token_id", "the BOS token"),
             ("eos_token_id", "the end-of-text token, after which a document starts (this tokenizer has no BOS token)"))
    for attribute, what in kinds:
        token_id = getattr(tokenizer, attribute, None)
        if isinstance(token_id, (list, tuple)):  # some configs list several end tokens: the first is the document's
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            return [int(token_id)], f"{what} {tokenizer.decode([int(token_id)])!r}"
    raise PromptError("this tokenizer has neither a BOS nor an end-of-text token to start from; pass a prompt")


def start_ids(tokenizer, prompt_or_ids: str | Sequence[int] | torch.Tensor | None) -> list[int]:
    """Token ids of the prompt, or the document start when no prompt is given (the minimal prompt of Fig. 2)."""
    return document_start(tokenizer)[0] if prompt_or_ids is None else tokenize(tokenizer, prompt_or_ids)


def check_length(model: nn.Module, n_prompt: int, n_tokens: int) -> None:
    """Refuse a non-positive token count, or a continuation longer than the model's positions."""
    check_int(n_tokens, "n_tokens", minimum=1)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and n_prompt + n_tokens > max_pos:
        raise PromptError(f"{n_prompt} prompt tokens + {n_tokens} new tokens exceed the model's {max_pos} positions")


def next_token_logits(model: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """The model's logits (vocab,) for the token after ids, from a full forward without cache."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)], device=model.device), use_cache=False, logits_to_keep=1)
    return out.logits[0, -1]


def top_next_tokens(model: nn.Module, tokenizer, ids: Sequence[int], k: int = 5) -> list[dict]:
    """The k most probable next tokens after ids, best first: [{"id", "token", "prob"}], from the model's own
    logits (Gemma's final soft-capping included); lllm's one definition of the next-token distribution."""
    probs = torch.softmax(next_token_logits(model, ids).double(), dim=-1)
    top = torch.topk(probs, check_int(k, "k", minimum=1))
    return [{"id": int(i), "token": tokenizer.decode([int(i)]), "prob": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]


def greedy_continuation(model: nn.Module, ids: Sequence[int], n_tokens: int) -> list[int]:
    """n_tokens greedy (argmax) token ids after ids; every step recomputes the whole sequence."""
    check_length(model, len(ids), n_tokens)
    ids, new = list(ids), []
    for _ in range(n_tokens):
        new.append(int(next_token_logits(model, ids + new).argmax()))
    return new


def generate_with_jacobians(
    model: nn.Module,
    tokenizer,
    prompt_or_ids: str | Sequence[int] | torch.Tensor | None = None,
    n_tokens: int = 4,
    *,
    k: int | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    mlp_split: str = "activation",
) -> GenerationResult:
    """Greedy generation of n_tokens from a prompt (default [BOS]) with J⁺ of every prediction (Fig. 2).

    k: also keep the top-k singular values of every J⁺ᵢ (d_out, d_in) of every step, (T, k) per step.
    """
    prompt = start_ids(tokenizer, prompt_or_ids)
    check_length(model, len(prompt), n_tokens)
    ids, steps = list(prompt), []
    for _ in tqdm(range(n_tokens), desc="generation steps", disable=not progress, leave=False):
        result = detached_jacobian(model, tokenizer, ids, chunk_size=chunk_size, progress=progress, mlp_split=mlp_split)
        logits = next_token_logits(model, ids)
        token_id = int(logits.argmax())  # the same argmax as greedy_continuation
        probability = float(torch.softmax(logits.double(), dim=-1)[token_id])
        spectrum = None if k is None else torch.stack([block.S for block in token_svds(result, k)])
        steps.append(GenerationStep(result, token_id, tokenizer.decode([token_id]), probability, spectrum))
        ids.append(token_id)
    start = document_start(tokenizer)[1] if prompt_or_ids is None else f"the prompt {tokenizer.decode(prompt)!r}"
    return GenerationResult(prompt_ids=prompt, steps=steps, text=tokenizer.decode(ids), start=start)
