"""What a stored result says about itself: canonical JSON, dtype names, the identity of a model, the fields of a
computation (the cache key and the metadata alike), the versions that made it, and JacobianResult records."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from lllm.errors import CacheError
from lllm.kernel.jacobian import JacobianResult


# Config fields that say where or how a model was loaded, not what it computes.
CONFIG_FIELDS_NOT_IDENTITY = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "lllm_name")


def _json_default(value: Any) -> Any:
    """JSON form of the few non-JSON types that appear in options and metadata."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def canonical_json(value: Any) -> str:
    """The one JSON text of `value`: sorted keys, no spaces, ASCII; used for keys and digests."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise CacheError(f"cannot store {value!r:.200}: {exc}; use str, numbers, lists and dicts") from exc


def as_json_native(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, dtypes strings), so digests agree."""
    return json.loads(canonical_json(value))


def sha256_text(text: str) -> str:
    """Hex sha256 of UTF-8 text."""
    return hashlib.sha256(text.encode()).hexdigest()


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32' for torch.float32 or 'torch.float32' or 'float32'."""
    return str(dtype).removeprefix("torch.")


# model -> (fingerprint of parameter storages and versions, weights sha256): hashing weights is
# costly for real models, and a module's weights only change through in-place ops, which bump _version.
WEIGHTS_SHA_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_sha256(model: nn.Module) -> str:
    """Hex sha256 over the names, dtypes, shapes and bytes of every tensor in the state dict."""
    state = model.state_dict()
    fingerprint = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    memo = WEIGHTS_SHA_MEMO.get(model)
    if memo is not None and memo[0] == fingerprint:
        return memo[1]
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{dtype_name(t.dtype)}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, not copied
    WEIGHTS_SHA_MEMO[model] = (fingerprint, digest.hexdigest())
    return digest.hexdigest()


def config_sha256(model: nn.Module) -> str:
    """Hex sha256 of the model's config, without the fields that only say where it was loaded from."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    for name in CONFIG_FIELDS_NOT_IDENTITY:
        config.pop(name, None)
    return sha256_text(canonical_json(config))


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What identifies a model's weights: name, family, and the file sha256, else config and weights sha256.

    Models loaded by lllm.io.models.load carry `lllm_source` (name, path, sha256, family); the file sha256
    then identifies the weights. Any other model (a hub directory, a tiny test model) is identified by
    its class name, config hash and a hash of its weights, so two models with the same config but
    different weights never share cache entries.
    """
    source = getattr(model, "lllm_source", None)
    if isinstance(source, Mapping):
        identity = {"name": source.get("name"), "family": source.get("family"), "sha256": source.get("sha256")}
        if identity["sha256"] is None:
            identity.update(config_sha256=config_sha256(model), weights_sha256=weights_sha256(model))
        return identity
    return {
        "name": type(model).__name__,
        "family": getattr(model.config, "model_type", None),
        "config_sha256": config_sha256(model),
        "weights_sha256": weights_sha256(model),
    }


def computation_fields(
    model: nn.Module | None,
    prompt_or_ids: str | Sequence[int] | torch.Tensor | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    dtype: torch.dtype | str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields that say what was computed: model identity, prompt, token ids, dtype, options.

    Used both as cache key fields and as result metadata. Ids passed as the prompt go to token_ids.
    dtype defaults to the model's parameter dtype.
    """
    prompt = prompt_or_ids if isinstance(prompt_or_ids, str) else None
    if prompt_or_ids is not None and prompt is None:
        token_ids = torch.as_tensor(prompt_or_ids).reshape(-1).tolist()
    if dtype is None and model is not None:
        dtype = next(model.parameters()).dtype
    return {
        "model": None if model is None else model_identity(model),
        "prompt": prompt,
        "token_ids": None if token_ids is None else [int(i) for i in token_ids],
        "dtype": None if dtype is None else dtype_name(dtype),
        "options": dict(options or {}),
    }


def versions() -> dict[str, str | None]:
    """Versions of lllm, torch, transformers, safetensors and Python that produced a result."""
    import lllm  # late: lllm/__init__ may import this module before it defines __version__

    def installed(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "lllm": lllm.__version__, "torch": torch.__version__, "transformers": installed("transformers"),
        "safetensors": safetensors.__version__, "python": platform.python_version(),
    }


JACOBIAN_TENSORS = ("jacobian", "inputs", "output")


def result_to_record(
    result: JacobianResult,
    model: nn.Module | None = None,
    prompt: str | Sequence[int] | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a JacobianResult: J (d_out, T, d_in), x (T, d_in), y (d_out,), c (d_out,) if any."""
    tensors = {name: getattr(result, name) for name in JACOBIAN_TENSORS}
    if result.bias is not None:
        tensors["bias"] = result.bias
    meta = computation_fields(model, prompt, token_ids=result.token_ids, dtype=result.jacobian.dtype, options=options)
    meta["token_ids"] = list(result.token_ids)  # what was actually computed, even if a prompt was given
    meta["tokens"] = list(result.tokens)
    meta["jacobian"] = {
        "detached": result.detached, "position": result.position, "mlp_split": result.mlp_split,
        "seconds": result.seconds, "has_bias": result.bias is not None, "meta": as_json_native(result.meta),
        "relative_error": result.relative_error,  # for readers of meta.json; recomputable from the tensors
    }
    return tensors, meta


def record_to_result(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> JacobianResult:
    """The JacobianResult that result_to_record stored (bias None when it had none)."""
    fields = meta.get("jacobian")
    missing = [n for n in JACOBIAN_TENSORS if n not in tensors]
    if not isinstance(fields, Mapping) or missing or "tokens" not in meta or meta.get("token_ids") is None:
        raise CacheError(f"not a JacobianResult record (tensors {sorted(tensors)}, meta keys {sorted(meta)})")
    if fields["has_bias"] != ("bias" in tensors):
        raise CacheError(f"the record says has_bias={fields['has_bias']} but its tensors are {sorted(tensors)}")
    return JacobianResult(
        jacobian=tensors["jacobian"], inputs=tensors["inputs"], output=tensors["output"], bias=tensors.get("bias"),
        token_ids=list(meta["token_ids"]), tokens=list(meta["tokens"]), detached=fields["detached"],
        position=fields["position"], mlp_split=fields["mlp_split"], seconds=fields["seconds"],
        meta=dict(fields["meta"]),
    )
