"""The sentence that closes a figure page: what this page's numbers say, set beside what the paper reports.

Every number is read from the analysis the page drew; nothing is typed in. Each function returns markdown without
math (a notebook's markdown output is not typeset), so symbols are written in Unicode: J⁺ᵢ, u₁.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lllm.analyses.decompose import per_token_stable_rank
from lllm.analyses.generation import GenerationResult
from lllm.analyses.pipeline import PromptAnalysis
from lllm.analyses.steering import SteeringResult
from lllm.apps.claims import FLOAT32_ORDER
from lllm.apps.plots import predicted_token, token_text
from lllm.apps.steering_tables import concept_appears



def _where(model_label: str, dtype: str) -> str:
    return f"On {model_label} in {dtype}"


def reconstruction(analysis: PromptAnalysis, model_label: str, dtype: str) -> str:
    """Fig 3: the detached and the ordinary Jacobian's reconstruction errors, against the paper's order."""
    error, ordinary = analysis.meta["relative_error"], analysis.meta["ordinary_relative_error"]
    agrees = dtype != "float32" or error < FLOAT32_ORDER  # the threshold of the Paper vs. this book claim
    verdict = ("as the paper's Fig. 3 reports for float32 (on the order of 10⁻⁶)" if dtype == "float32" and agrees
               else "above the paper's order of 10⁻⁶ for float32" if not agrees
               else f"in {dtype}, where the paper gives no figure")
    return (f"**Reading.** {_where(model_label, dtype)}, the detached Jacobian reconstructs *y* with relative error "
            f"{error:.1e}, {verdict}; the ordinary Jacobian's reconstruction is off by {ordinary:.2g}, so its points "
            f"leave the identity line{' as in the paper' if ordinary > 100 * error else ''}.")


def spectra(analysis: PromptAnalysis, model_label: str, dtype: str) -> str:
    """Fig 4B: how low rank the per-token J⁺ᵢ are, and what the last token's top singular vector decodes to."""
    ranks = analysis.meta["token_stable_rank"]
    first_u = analysis.meta["token_decodings"][-1][0]["u"]["tokens"][0]
    prediction = predicted_token(analysis)
    same = first_u.strip() == prediction.strip()
    return (f"**Reading.** {_where(model_label, dtype)}, the stable rank of the matrices J⁺ᵢ ranges from "
            f"{min(ranks):.2f} to {max(ranks):.2f} (of a possible {analysis.final.jacobian.shape[0]}): extremely low "
            f"rank, as in the paper's Fig. 4B. The last token's top left singular vector u₁ decodes to "
            f"{token_text(first_u)!r}, {'the' if same else 'not the'} predicted token {token_text(prediction)!r}; "
            "in the paper U decodes to candidate predictions.")


def depth(analysis: PromptAnalysis, model_label: str, dtype: str) -> str:
    """Fig 6C: the cumulative stable rank of the layer outputs from the first to the last analysed layer."""
    layers, ranks = analysis.layers, analysis.stable_ranks("cumulative")["layer"]
    peak = max(range(len(ranks)), key=ranks.__getitem__)
    direction = "falls" if ranks[-1] < ranks[0] else "rises"
    return (f"**Reading.** {_where(model_label, dtype)}, the cumulative stable rank of the layer output {direction} "
            f"from {ranks[0]:.2f} at layer {layers[0]} to {ranks[-1]:.2f} at layer {layers[-1]}, with its largest "
            f"value, {ranks[peak]:.2f}, at layer {layers[peak]}. The paper's Fig. 6C sees it decrease deeper into the "
            "network (Llama 3.2 3B).")


def emergence(analysis: PromptAnalysis, model_label: str, dtype: str) -> str:
    """Tables 1–3: the first analysed layer whose top singular vectors decode to the predicted token."""
    prediction = predicted_token(analysis).strip()
    found = [ell for ell, row in zip(analysis.layers, analysis.meta["layer_decodings"])
             if any(entry["tokens"][0].strip() == prediction for entry in row)]
    where = (f"first appears among the top three decoded singular vectors at layer {found[0]} of "
             f"{analysis.layers[-1] + 1}" if found else "does not appear among the top three decoded singular vectors "
             "of any analysed layer")
    return (f"**Reading.** {_where(model_label, dtype)}, the predicted token {token_text(prediction)!r} {where}. "
            "In the paper the prediction emerges in the later layers (“only” in layer 19 of Llama 3.2 3B's 28).")


def generation(result: GenerationResult, model_label: str, dtype: str) -> str:
    """Fig 2: how exact and how low rank the J⁺ of every generation step are."""
    errors = [step.jacobian.relative_error for step in result.steps]
    ranks = [float(per_token_stable_rank(step.jacobian).max()) for step in result.steps]
    d = result.steps[0].jacobian.jacobian.shape[0]
    return (f"**Reading.** {_where(model_label, dtype)}, greedy generation from {result.start} gives "
            f"{' '.join(repr(token_text(t)) for t in result.tokens)}. At each of its {len(result.steps)} steps J⁺ "
            f"reconstructs the predicted embedding to at most {max(errors):.1e}, and no J⁺ᵢ has a stable rank above "
            f"{max(ranks):.2f} (of a possible {d}): extremely low rank, as the insets of the paper's Fig. 2 show.")


def across_models(analyses: Mapping[str, PromptAnalysis], dtype: str) -> str:
    """Fig 5: exactness, rank and the decoded u₁ of the last token, model by model."""
    errors = {name: a.meta["relative_error"] for name, a in analyses.items()}
    ranks = {name: max(a.meta["token_stable_rank"]) for name, a in analyses.items()}
    hits = [name for name, a in analyses.items()
            if a.meta["token_decodings"][-1][0]["u"]["tokens"][0].strip() == predicted_token(a).strip()]
    widest = max(ranks, key=ranks.get)
    return (f"**Reading.** On the {len(analyses)} models in {dtype}, J⁺ reconstructs y to between "
            f"{min(errors.values()):.1e} and {max(errors.values()):.1e}; the largest stable rank of any J⁺ᵢ is "
            f"{ranks[widest]:.2f} ({widest}), so every spectrum is extremely low rank, as in the paper's Fig. 5. The "
            f"last token's u₁ decodes to the model's own prediction on {len(hits)} of {len(analyses)} models"
            f"{' (' + ', '.join(hits) + ')' if hits else ''}; the paper's larger models decode to bridge and Bay Area "
            "words.")


def steering(sweeps: Mapping[str, Sequence[SteeringResult]], word: str, model_label: str, dtype: str) -> str:
    """Table 4: for how many prompts the concept word enters a steered continuation, and from which λ on."""
    steered = {prompt: [r.lam for r in sweep if r.lam < 1 and concept_appears(r, word)]
               for prompt, sweep in sweeps.items()}
    hits = {prompt: max(lams) for prompt, lams in steered.items() if lams}
    layer = next(iter(sweeps.values()))[0].layer
    where = ("; it appears first (largest λ) at " + ", ".join(f"λ = {lam:g} for {prompt!r}" for prompt, lam in
                                                            hits.items())) if hits else ""
    return (f"**Reading.** {_where(model_label, dtype)}, steering at layer {layer} with the J⁺ of the concept brings "
            f"{word!r} into the continuation of {len(hits)} of {len(sweeps)} prompts{where}. In the paper's Table 4 "
            "the continuations of Llama 3.2 3B turn to the Golden Gate Bridge.")
