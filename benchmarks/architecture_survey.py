"""Every `*ForCausalLM` class in transformers on a tiny random config: exact, refused, or not built.

    python benchmarks/architecture_survey.py [--out benchmarks/architecture_survey.json]

For each class, a tiny config is made from its config class by shrinking the usual size fields; classes
whose config will not build that way are listed as "not built" (no verdict). Each built model is run
through `lllm.detached_jacobian` in float64 and float32 (eager attention and experts, random weights):

- exact:   J⁺ reconstructs y (≤ 1e-12 fp64, ≤ 5e-6 fp32), the fp32 forward is bitwise unchanged, y is what
           lm_head reads, the ordinary J does not (lllm.apps.zoo.check_architecture, as the tests);
- refused: an `LLLMError` (the op, module and modeling line it names are recorded);
- WRONG:   anything else that returned a number: the case that must never happen.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import warnings

import torch
import transformers

import lllm
from lllm.apps.zoo import check_architecture

SIZES = dict(hidden_size=32, n_embd=32, d_model=32, num_hidden_layers=2, n_layer=2, num_layers=2,
             num_attention_heads=4, n_head=4, num_key_value_heads=2, intermediate_size=64, ffn_dim=64,
             n_inner=64, vocab_size=96, head_dim=8, max_position_embeddings=128, n_positions=128,
             moe_intermediate_size=16, num_experts=4, num_local_experts=4, n_routed_experts=4,
             num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
IDS = [1, 5, 9, 17, 33, 41, 60, 77, 80, 12]


def _tiny(model_cls, dtype):
    config_cls = model_cls.config_class
    config = config_cls()
    text = config.get_text_config()
    for key, value in SIZES.items():
        if hasattr(text, key) and not isinstance(getattr(text, key), (list, dict)):
            setattr(text, key, value)
    for sub in {id(c): c for c in (config, text)}.values():
        sub._attn_implementation = "eager"
        sub._experts_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    return model.requires_grad_(False)


def survey_one(model_cls) -> dict:
    row = {"class": model_cls.__name__}
    try:
        vocab = _tiny(model_cls, torch.float32).get_input_embeddings().num_embeddings
        ids = [i % vocab for i in IDS]
        _tiny(model_cls, torch.float32)(torch.tensor([ids]), use_cache=False)
    except Exception as error:  # noqa: BLE001 - a config that does not build is reported, not judged
        return {**row, "verdict": "not built", "why": f"{type(error).__name__}: {str(error)[:200]}"}
    try:
        return check_architecture(lambda dtype: _tiny(model_cls, dtype), ids)
    except lllm.LLLMError as error:
        return {**row, "verdict": "refused", "why": f"{type(error).__name__}: {str(error)[:300]}"}
    except Exception as error:  # noqa: BLE001 - a raw exception is reported as such: it should be an lllm error
        return {**row, "verdict": "crashed", "why": f"{type(error).__name__}: {str(error)[:300]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/architecture_survey.json")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per class")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    classes = sorted((getattr(transformers, n) for n in dir(transformers) if n.endswith("ForCausalLM")),
                     key=lambda c: c.__name__)
    rows = []

    def alarm(*_):
        raise TimeoutError("over the time limit")

    signal.signal(signal.SIGALRM, alarm)
    for cls in classes:
        start = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            row = survey_one(cls)
        except TimeoutError:
            row = {"class": cls.__name__, "verdict": "not built", "why": "over the time limit"}
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        print(f"{row['class']:45s} {row['verdict']:9s} {row.get('fp64', ''):<24} {row.get('why', '')[:110]}", flush=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("exact", "refused", "WRONG", "crashed", "not built")}
    print(counts)
    with open(args.out, "w") as fh:
        json.dump({"transformers": transformers.__version__, "counts": counts, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
