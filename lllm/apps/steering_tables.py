"""Table 4 and Paper vs. this book: the λ sweeps of a concept's steering operator, tabulated and counted.

A sweep is the list of SteeringResults of one prompt, one per λ (lllm.analyses.steering.lambda_sweep);
`sweeps` maps each steered prompt to its sweep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from lllm.analyses.steering import SteeringResult


def concept_word(concept: str) -> str:
    """The word steering should bring into a continuation: the concept's first capitalized word after its opening
    one ("Golden" of the paper's "The Golden Gate", Sec. 3.6), else its last word."""
    words = concept.split()
    return next((w for w in words[1:] if w[:1].isupper()), words[-1])


def concept_appears(result: SteeringResult, word: str) -> bool:
    """Whether word (case-insensitive) is in the steered continuation and not in the normal one."""
    word = word.lower()
    return word in result.steered_text.lower() and word not in result.normal_text.lower()


def tokens_changed(sweep: Sequence[SteeringResult]) -> list[int]:
    """Per λ of the sweep, how many generated tokens differ from the normal continuation."""
    return [sum(a != b for a, b in zip(r.steered_ids, r.normal_ids)) for r in sweep]


def unchanged_at_one(sweeps: Mapping[str, Sequence[SteeringResult]]) -> dict[str, bool]:
    """prompt -> whether its λ = 1 continuation is the normal one (eq. 16 at λ = 1 is the model itself).

    Prompts whose sweep has no λ = 1 are left out.
    """
    same = {prompt: [not r.changed for r in sweep if r.lam == 1.0] for prompt, sweep in sweeps.items()}
    return {prompt: all(values) for prompt, values in same.items() if values}


def continuations_table(sweeps: Mapping[str, Sequence[SteeringResult]]) -> pd.DataFrame:
    """Table 4: per prompt, its normal continuation, then the steered one of every λ; indexed by (prompt, λ)."""
    rows = []
    for prompt, sweep in sweeps.items():  # the texts hold the prompt: show only what was generated
        rows.append({"prompt": prompt, "λ": "normal", "continuation": sweep[0].normal_continuation})
        rows += [{"prompt": prompt, "λ": f"{r.lam:g}", "continuation": r.steered_continuation} for r in sweep]
    return pd.DataFrame(rows).set_index(["prompt", "λ"])
