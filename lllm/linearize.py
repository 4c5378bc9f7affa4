"""The detach mechanism: make a decoder locally linear in its input embeddings, exactly and reversibly.

Inside `detached(model)` every nonlinear factor is frozen at its value for the current input:

- RMSNorm: x · rsqrt(mean(x²)+ε) · w with the rsqrt term detached (paper eq. 4);
- gated MLP: down(act(gate(x)) ⊙ up(x)) with act(gate(x)) detached (eq. 8), or, with
  ``mlp_split="gate"``, gate(x) live and up(x) ⊙ act(gate)/gate detached. Both splits give the
  same y and both reconstruct it; they give different J⁺ (the split is not unique);
- attention: Q and K are detached as they leave their projections, so the softmax weights
  (and RoPE, q/k norms, soft-capping and sliding-window masks, which only act on Q·Kᵀ) are
  frozen while V stays live (eq. 12).

Each patched forward repeats transformers' op sequence with `.detach()` on the frozen factor, so
float32 outputs are bit-for-bit unchanged. For float64 inputs the norms compute in float64
instead of transformers' float32 upcast, which would otherwise cap the reconstruction at ~1e-7;
float32/bf16/fp16 keep the upcast to float32 exactly as transformers does.

Patches are instance attributes (`module.forward`) and forward hooks, removed on exit: nothing
is written to disk and no transformers source is copied.

The frozen factors can be *recorded* on one forward and *replayed* on later ones
(`Linearization.replay`): the network is then one fixed linear (affine, with biases) map that can
be applied to any batch of inputs, which is what forward-mode sweeps use.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import CoverageError, UnsupportedModelError
from .families import GATE_ACTIVATIONS, LINEAR_MODULES, Family, family_of

MLP_SPLITS = ("activation", "gate")


@dataclass
class Linearization:
    """State of one `detached` context: the family, the options, and recorded frozen factors."""

    model: nn.Module
    family: Family
    mlp_split: str = "activation"
    record: bool = False  # store each frozen factor on the next forwards
    replay: bool = False  # use stored factors instead of computing them from the input
    # Replay on the recorded tokens start…stop-1 only (stop None: to the end). Exact for inputs that are
    # zero before `start` and outputs read before `stop`: causal attention carries nothing backwards.
    start: int = 0
    stop: int | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict)

    def frozen(self, key: str, compute: Callable[[], torch.Tensor], token_dims: tuple[int, ...] = (-2,)) -> torch.Tensor:
        """The frozen factor `key`: recorded/replayed when asked, else computed and detached."""
        if self.replay:
            return self.replayed(key, token_dims)
        value = compute().detach()
        if self.record:
            self.factors[key] = value
        return value

    def replayed(self, key: str, token_dims: tuple[int, ...] = (-2,)) -> torch.Tensor:
        """The recorded factor `key`, its token axes `token_dims` cut to tokens start…stop-1."""
        if key not in self.factors:
            raise UnsupportedModelError(f"no recorded frozen factor for {key!r}; record a forward first")
        factor = self.factors[key]
        for dim in token_dims if self.start or self.stop is not None else ():
            stop = factor.shape[dim] if self.stop is None else self.stop
            factor = factor.narrow(dim, self.start, stop - self.start)
        return factor


# ---------------------------------------------------------------------------------------------
# Coverage: every module is known-linear, patched, a declared container, or a frozen child.
# ---------------------------------------------------------------------------------------------


def check_coverage(model: nn.Module, family: Family | None = None) -> Family:
    """Raise CoverageError unless every module of `model` is handled by its family adapter."""
    family = family or family_of(model)
    if model.training:
        raise UnsupportedModelError("model is in training mode (dropout is random); call model.eval() first")
    modules = dict(model.named_modules())
    for path, module in modules.items():
        _check_unmodified(path or "<root>", module)
        cls = type(module).__name__
        known = (
            family.containers + LINEAR_MODULES + family.embeddings + family.rotary
            + tuple(family.norms) + tuple(family.mlps) + tuple(family.attentions)
        )
        if cls in known:
            if cls in family.attentions:
                _check_eager(path, module)
            continue
        parent_path, _, child = path.rpartition(".")
        parent_cls = type(modules[parent_path]).__name__ if path else ""
        if parent_cls in family.mlps and child in ("act_fn", "activation_fn") and cls in GATE_ACTIVATIONS:
            continue  # applied only to the gate, whose activation the MLP patch freezes
        if parent_cls in family.attentions and child in family.frozen_children:
            continue  # q/k norms see only detached Q/K: constant in x
        raise CoverageError(
            f"module {path or '<root>'!r} of class {type(module).__module__}.{cls} is not known to lllm's "
            f"{family.name!r} adapter: it is not a known-linear module, a patched norm/MLP/attention, or a "
            "declared container, so the detached Jacobian could silently be wrong. Add it to the family "
            "adapter in lllm/families.py if it is linear in its input."
        )
    return family


def _check_unmodified(path: str, module: nn.Module) -> None:
    """The adapters know transformers' forwards by class name: refuse anything that changes what runs."""
    if module.training:
        raise UnsupportedModelError(f"module {path!r} is in training mode (dropout is random); call model.eval() first")
    if "forward" in module.__dict__:
        raise CoverageError(f"module {path!r} has its own forward, which the class-name adapter would replace; use "
                            "lllm.detached_jacobian (op-level), which linearizes the forward that really runs")
    if module._forward_hooks or module._forward_pre_hooks:
        raise CoverageError(f"module {path!r} has forward hooks, which the class-name adapter cannot see; use "
                            "lllm.detached_jacobian (op-level), which linearizes what the hooks compute")
    origin = type(module).__module__
    if not origin.startswith(("transformers.", "torch.nn.")):
        raise CoverageError(f"module {path!r} is of class {origin}.{type(module).__name__}, not transformers' own; "
                            "the class-name adapter cannot know its forward")


def _check_eager(path: str, attention: nn.Module) -> None:
    """Refuse any attention implementation other than eager."""
    config = getattr(attention, "config", None)
    impl = getattr(config, "_attn_implementation", None)  # transformers has no public getter
    if impl != "eager":
        raise UnsupportedModelError(
            f"attention module {path!r} uses attn_implementation={impl!r}; lllm needs 'eager' so that the "
            "frozen softmax is the one computed in the forward. Load with lllm.load() or pass "
            "attn_implementation='eager' to from_pretrained (or call model.set_attn_implementation('eager'))."
        )


# ---------------------------------------------------------------------------------------------
# Patched forwards. Each repeats transformers' op order exactly, detaching only the frozen factor.
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """transformers upcasts norms to float32; keep that, except keep float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor, *, lin: Linearization, key: str, style: str):
    """RMSNorm with rsqrt(mean(x²)+ε) frozen; `style` selects the family's weight convention."""
    input_dtype = hidden_states.dtype
    h = hidden_states.to(_compute_dtype(input_dtype))
    eps = getattr(self, "variance_epsilon", None)
    eps = self.eps if eps is None else eps
    token_dims = (-2,) if h.dim() == 3 else ()  # a (B, d) logit-lens readout has no token axis
    inv_rms = lin.frozen(key, lambda: torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps), token_dims)  # (B, T, 1)
    h = h * inv_rms
    if style == "weight_after_cast":
        return self.weight * h.to(input_dtype)
    if style == "weight_before_cast":
        return (self.weight * h).to(input_dtype)
    return (h * (1.0 + self.weight.to(h.dtype))).to(input_dtype)  # one_plus_weight (Gemma)


def frozen_norm(lin: Linearization, norm: nn.Module, hidden: torch.Tensor, key: str) -> torch.Tensor:
    """Apply a patched norm module to `hidden` with its own frozen factor `key` (logit-lens readouts)."""
    style = lin.family.norms[type(norm).__name__]
    return _norm_forward(norm, hidden, lin=lin, key=key, style=style)


def _gate_and_up(self: nn.Module, x: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    """(gate(x), up(x), act) for split or fused gate/up projections."""
    if style == "fused":
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return gate, up, self.activation_fn
    return self.gate_proj(x), self.up_proj(x), self.act_fn


def _live_branch(self: nn.Module, x: torch.Tensor, style: str, branch: str) -> torch.Tensor:
    """up(x) or gate(x) alone (B, T, I): under replay the other branch is a recorded factor, not computed."""
    if style == "split":
        return (self.up_proj if branch == "up" else self.gate_proj)(x)
    weight, bias = self.gate_up_proj.weight, self.gate_up_proj.bias  # rows: gate, then up
    half = slice(weight.shape[0] // 2, None) if branch == "up" else slice(0, weight.shape[0] // 2)
    return nn.functional.linear(x, weight[half], None if bias is None else bias[half])


def _mlp_forward(self: nn.Module, x: torch.Tensor, *, lin: Linearization, key: str, style: str):
    """Gated MLP, linear in x through exactly one of its two branches."""
    if lin.replay:
        live = _live_branch(self, x, style, "up" if lin.mlp_split == "activation" else "gate")
        return self.down_proj(lin.replayed(key) * live)
    gate, up, act = _gate_and_up(self, x, style)  # (B, T, I) each
    if lin.mlp_split == "activation":
        # paper eq. (8): act(gate(x)) frozen, up(x) live; same op order => bitwise-equal output
        return self.down_proj(lin.frozen(key, lambda: act(gate)) * up)
    # "gate" split: gate(x) live, up(x)·act(g)/g frozen. act(g)/g -> 1/2 at g = 0 for SiLU and GELU.
    frozen = lin.frozen(key, lambda: up * torch.where(gate == 0, 0.5, act(gate) / gate))
    hidden = gate * frozen
    # hidden and act(g)·up agree to a few ulps, so (exact - hidden) is exact (Sterbenz) and the
    # sum below returns act(g)·up bit for bit; the detached correction is a rounding-level constant.
    hidden = hidden + (act(gate) * up - hidden).detach()
    return self.down_proj(hidden)


def _qk_hook(lin: Linearization, key: str, n_frozen: int | None):
    """Forward hook on a Q/K (or fused QKV) projection: detach the Q/K columns (replay bypasses it: see
    _attention_forward, which uses the recorded softmax weights instead)."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        qk = output if n_frozen is None else output[..., :n_frozen]  # (B, T, q+k)
        frozen = lin.frozen(key, lambda: qk)
        return frozen if n_frozen is None else torch.cat([frozen, output[..., n_frozen:]], dim=-1)

    return hook


def _attention_forward(self: nn.Module, *args, lin: Linearization, key: str, style: str, original: Callable, **kwargs):
    """Attention: transformers' own forward (Q/K frozen by hooks), recording the softmax weights P;
    under replay, o_proj(P · V(x)) with P replayed, so Q, K, RoPE and the softmax are not recomputed."""
    if not lin.replay:
        output, probs = original(*args, **kwargs)
        if lin.record:
            lin.factors[f"{key}.probs"] = probs.detach()  # (1, H, T, T): eager returns the weights it used
        return output, probs
    hidden_states = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
    batch, n_tokens = hidden_states.shape[:2]
    n_kv, head_dim = self.config.num_key_value_heads, self.head_dim
    if style == "fused_qkv":  # rows q, k, v: only v is live
        n_v, weight, bias = n_kv * head_dim, self.qkv_proj.weight, self.qkv_proj.bias
        v = nn.functional.linear(hidden_states, weight[-n_v:], None if bias is None else bias[-n_v:])
    else:
        v = self.v_proj(hidden_states)
    v = v.view(batch, n_tokens, n_kv, 1, head_dim).permute(0, 2, 3, 1, 4)  # (B, kv, 1, T, hs)
    probs = lin.replayed(f"{key}.probs", (-2, -1))  # (1, H, T, T); heads grouped per kv head as repeat_kv
    probs = probs.reshape(probs.shape[0], n_kv, -1, n_tokens, n_tokens)  # (1, kv, H/kv, T, T)
    out = (probs @ v).flatten(1, 2).transpose(1, 2).reshape(batch, n_tokens, -1)  # (B, T, H·hs)
    return self.o_proj(out), None


class _Float64Policy(TorchFunctionMode):
    """float64 means float64, as on the op-level path: transformers casts softmax, norms and rotary tables to
    float32; here no float64 tensor is cast down, softmax keeps float64, and lower floats meeting one are cast up."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not any(t.dtype == torch.float64 for t in tensors):
            return func(*args, **kwargs)
        if name in ("softmax", "log_softmax") and kwargs.get("dtype") is not None:
            kwargs = {**kwargs, "dtype": torch.float64}
        if name in ("to", "type", "type_as", "float", "half", "bfloat16") and args[0].dtype == torch.float64:
            result = func(*args, **kwargs)
            narrowed = isinstance(result, torch.Tensor) and result.is_floating_point() and result.dtype != torch.float64
            return args[0] if narrowed else result
        up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        return func(*tree_map(up, args), **tree_map(up, kwargs))


@contextmanager
def detached(model: nn.Module, *, mlp_split: str = "activation", record: bool = False) -> Iterator[Linearization]:
    """Make `model` locally linear in its input embeddings until exit; restore it exactly after.

    mlp_split: "activation" freezes act(gate(x)) (paper default); "gate" freezes up(x)·act(g)/g.
    record: keep every frozen factor, so that `lin.replay = True` replays them on later forwards.
    """
    if mlp_split not in MLP_SPLITS:
        raise ValueError(f"mlp_split must be one of {MLP_SPLITS}, got {mlp_split!r}")
    if getattr(model, "_lllm_detached", False):
        raise UnsupportedModelError("model is already inside lllm.detached(); nesting is not supported")
    family = check_coverage(model)
    lin = Linearization(model=model, family=family, mlp_split=mlp_split, record=record)
    saved_forwards: list[tuple[nn.Module, object]] = []
    hooks = []
    try:
        for path, module in model.named_modules():
            cls = type(module).__name__
            if cls in family.norms:
                patch, style = _norm_forward, family.norms[cls]
            elif cls in family.mlps:
                patch, style = _mlp_forward, family.mlps[cls]
            elif cls in family.attentions:
                hooks += _attach_qk_hooks(lin, path, module, family.attentions[cls])
                patch, style = _attention_forward, family.attentions[cls]
            else:
                continue
            saved_forwards.append((module, module.__dict__.get("forward")))
            extra = {"original": module.forward} if patch is _attention_forward else {}
            module.forward = types.MethodType(_bind(patch, lin=lin, key=path, style=style, **extra), module)
        model._lllm_detached = True
        float64 = next(model.parameters()).dtype == torch.float64
        with _Float64Policy() if float64 else nullcontext():  # as the op-level path
            yield lin
    finally:
        for handle in hooks:
            handle.remove()
        for module, previous in saved_forwards:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        model.__dict__.pop("_lllm_detached", None)


def _bind(fn: Callable, **kw) -> Callable:
    """fn with keyword arguments fixed, as a plain function suitable for types.MethodType."""

    def forward(self, *args, **kwargs):
        return fn(self, *args, **kwargs, **kw)

    return forward


def _attach_qk_hooks(lin: Linearization, path: str, attention: nn.Module, style: str) -> list:
    """Hooks that freeze Q and K of one attention module as they leave their projections."""
    if style == "fused_qkv":
        head_dim = attention.head_dim
        n_q = attention.config.num_attention_heads * head_dim
        n_k = attention.num_key_value_heads * head_dim
        return [attention.qkv_proj.register_forward_hook(_qk_hook(lin, f"{path}.qk", n_q + n_k))]
    return [
        attention.q_proj.register_forward_hook(_qk_hook(lin, f"{path}.q", None)),
        attention.k_proj.register_forward_hook(_qk_hook(lin, f"{path}.k", None)),
    ]
