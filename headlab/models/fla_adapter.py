"""flash-linear-attention (`fla`) GLA and DeltaNet models as HeadModels with honest implicit patterns.

fla's layers (`fla.layers.GatedLinearAttention`, `fla.layers.DeltaNet`) compute their attention with
Triton kernels and never call transformers' attention interface, so headlab's seam would never see them.
`attach(module)` replaces the module instance's `forward` by a pure-torch re-implementation of fla's
layer forward (the default configurations; see `_check_supported`) that computes q, k, v and GLA's log
decays / DeltaNet's β exactly as fla does, builds a `LinearMixer` and calls `capture.headlab_attention`
with it, then applies the rest of fla's forward (output norm / gate, o_proj). Patterns, captures and
head edits then work as for headlab's own linear layers (`pattern @ v == z`).

What headlab's z is, for these layers: the per-head output of the sequence mixer, `[B, T, H, Dv]`, *before*
fla's per-head output RMSNorm (GLA: `g_norm_swish_gate(o, g)` = RMSNorm(o)·w·swish(g), or `g_norm` then the
gate; DeltaNet: `o_norm`, gated when `use_gate`). This is the tensor that `pattern @ V` reproduces. The
out-projection headlab reports (`HeadModel.out_proj`) is `o_proj`, and head h's slice of o_proj's input
`[h·Dv, (h+1)·Dv)` is `gate_h · RMSNorm(z_h)`, not z_h itself: the norm is per head, so an edit of head h's
z reaches only head h's slice. Edits act on z, before the norm:

- zero ablation (and `Scale(factor=0)`) zero the head's o_proj input slice exactly (RMSNorm(0) = 0);
- `Scale` by any other factor c multiplies the head's slice by c·√(m + ε) / √(c²m + ε) (m = mean z_h² over
  the head's features, ε the norm's eps): about 1 wherever the head's output RMS is ≫ √ε, so such a scale
  is nearly a no-op (tested);
- replacements / overrides (mean or uniform ablation, patching) change z, which is then normalised.

What the records hold: q and k as fla hands them to its kernels (after projections, short convolution and
activations; before DeltaNet's l2 / sum norm and the q scale), v `[B, H, T, Dv]`, and the mixer (float32
fq = normalised q · head_k_dim^-0.5, fk, GLA's log decays g, DeltaNet's β). The mask given to the seam is
None for unpadded inputs and, for padded ones, a bool `[B, 1, T, T]` causal ∧ real-key mask (each query
also sees itself), as headlab's own linear layers give it.

Other geometry notes: fla's GLA supports grouped keys/values (`num_kv_heads`); fla repeats k, v and the
decays to every query head before mixing, and so does this adapter, so at the seam every query head has its
own (copied) k, v, g and HeadModel reports `n_kv_heads == n_heads`. `head_dim` is the value head dim
(`hidden_size · expand_v / num_heads`).

Padding: fla drops padded tokens (varlen) and zeroes the outputs at padded positions; the torch path
zeroes padded tokens' keys, decays and short-convolution inputs instead (the same result for right- or
left-padded `[B, T]` masks) and zeroes the outputs at padded positions too.

Caches: a forward with `use_cache=True` and an empty fla `Cache` (what fla's models do on every plain
call) gets the final recurrent and convolution states written to the cache in fla's layouts; continuing
from a cached state (decoding with past states) is not implemented on the torch path and raises.

On CUDA with no headlab capture or edit active, the patched forward calls fla's own (fast) forward.

fla's other modules (the blocks' RMSNorms, GatedMLP's SwiGLU) are Triton too and fail on CPU;
`torch_fallbacks(model)` gives them pure-torch forwards so that a whole fla model runs on CPU.
"""

from __future__ import annotations

import importlib.util
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from headlab.errors import UnsupportedModelError
from headlab.models.arch import ArchSpec, register_arch
from headlab.models.linear.mixer import LinearMixer

#: fla model_type -> (headlab mixer kind, fla layer class name)
FLA_FAMILIES = {"gla": ("gla", "GatedLinearAttention"), "delta_net": ("deltanet", "DeltaNet")}
_L2_EPS = 1e-6  # fla's l2norm: x / sqrt(Σx² + ε)
_SUM_EPS = 1e-6  # fla's sum_norm: F.normalize(p=1, eps)
_GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"swish": F.silu, "silu": F.silu,
                                                             "sigmoid": torch.sigmoid, "relu": F.relu}


# registration


def _geometry(config: Any) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads as seen at the seam (= n_heads: fla repeats k/v per head), value head dim)."""
    if getattr(config, "attn", None) is not None:
        raise UnsupportedModelError(
            f"this fla {config.model_type} model has softmax-attention layers too (config.attn = {config.attn!r}): "
            "headlab's fla adapter supports only models whose every layer is the linear mixer")
    heads = int(config.num_heads)
    value_dim = round(config.hidden_size * config.expand_v)
    if value_dim % heads:
        raise UnsupportedModelError(f"fla {config.model_type}: value dim {value_dim} is not divisible by "
                                    f"num_heads={heads}")
    return heads, heads, value_dim // heads


def register_fla() -> None:
    """Register fla's GLA and DeltaNet model_types with headlab (cheap: fla itself is imported only by `attach`).

    If ArchSpec has a model-level `prepare` hook, it gets `torch_fallbacks` (fla's norms / MLPs on CPU).
    """
    extra = {"prepare": torch_fallbacks} if "prepare" in ArchSpec.__dataclass_fields__ else {}
    for model_type, (kind, cls_name) in FLA_FAMILIES.items():
        register_arch(model_type, spec=ArchSpec(family=model_type, attn_classes=(cls_name,), out_proj="o_proj",
                                                attach=attach, geometry=_geometry, **extra))


def import_fla_for(model_type: str | None) -> None:
    """Import fla (whose import registers its Auto classes) when `model_type` is one of its families."""
    if model_type in FLA_FAMILIES:
        try:
            import fla  # noqa: F401
        except ImportError as err:
            raise UnsupportedModelError(
                f"this folder holds an fla {model_type} model: install flash-linear-attention to load it "
                "(pip install fla-core==0.6.0 flash-linear-attention==0.6.0)") from err


# the patched forward


def linear_backend(backend: str) -> Callable:
    """`module.headlab_backend`: the seam mixes an fla layer's values with its mixer, whatever the backend."""
    from headlab.models.linear.modeling import linear_attention_forward

    return linear_attention_forward


def attach(module: nn.Module) -> None:
    """Make an fla GLA / DeltaNet layer compute in torch through headlab's seam (idempotent).

    The original bound forward is kept as `module._headlab_fla_forward`; the module gets `kind`
    ("gla" / "deltanet") and `headlab_backend`.
    """
    name = type(module).__name__
    kinds = {cls: kind for kind, cls in FLA_FAMILIES.values()}
    if name not in kinds:
        raise UnsupportedModelError(f"the fla adapter handles {', '.join(kinds)} layers, not {name}")
    _check_supported(module, kinds[name])
    if "_headlab_fla_forward" not in module.__dict__:
        module._headlab_fla_forward = module.forward
    module.kind = kinds[name]
    module.headlab_backend = linear_backend
    module.forward = types.MethodType(_patched_forward, module)


def _check_supported(module: nn.Module, kind: str) -> None:
    def refuse(what: str) -> None:
        raise UnsupportedModelError(f"headlab's fla adapter does not implement {type(module).__name__} with {what}")

    if kind == "gla":
        if module.feature_map_fn is not None:
            refuse("a feature map (feature_map is not None)")
        if not module.fuse_norm_and_gate and module.use_output_gate and module.gate_fn not in _fla_gates():
            refuse("an output gate activation other than swish/silu/sigmoid/relu")
    else:
        if module.qk_activation not in ("silu", "relu", "elu", "identity"):
            refuse(f"qk_activation={module.qk_activation!r}")
        if module.qk_norm not in ("l2", "sum"):
            refuse(f"qk_norm={module.qk_norm!r}")
        if module.use_gate and getattr(module.o_norm, "activation", "swish") not in _GATES:
            refuse(f"an output-gate activation {module.o_norm.activation!r}")
    if module.use_short_conv:
        for conv in (module.q_conv1d, module.k_conv1d, module.v_conv1d):
            if conv.activation not in (None, "silu", "swish"):
                refuse(f"a short-convolution activation {conv.activation!r}")


def _fla_gates() -> dict[Callable, Callable]:
    """fla's (Triton) gate activations → torch equivalents."""
    from fla.modules.activations import ACT2FN

    return {ACT2FN[name]: fn for name, fn in _GATES.items() if name in ACT2FN}


def _scope_active(module: nn.Module) -> bool:
    """Whether a headlab capture or edit is active for the model this module belongs to."""
    from headlab.capture import is_active

    slot = module.__dict__.get("_headlab_slot")
    return slot is not None and slot.module_id == id(module) and is_active(slot.owner)


def _patched_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     past_key_values: Any = None, use_cache: bool | None = False,
                     output_attentions: bool | None = False, **kwargs: Any):
    if hidden_states.is_cuda and not _scope_active(self):
        return self._headlab_fla_forward(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                                         use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    return torch_forward(self, hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                         use_cache=use_cache, **kwargs)


def torch_forward(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  past_key_values: Any = None, use_cache: bool | None = False, **kwargs: Any):
    """fla's layer forward in torch, through headlab's seam; returns `(o, None, past_key_values)` like fla."""
    if kwargs.get("cu_seqlens") is not None:
        raise UnsupportedModelError("headlab's fla adapter does not support packed varlen inputs (cu_seqlens): "
                                    "pass a right-padded [B, T] batch with its attention_mask")
    B, T, _ = hidden_states.shape
    key_mask = _key_mask(attention_mask, B, T)
    last_state = None
    if past_key_values is not None:
        from fla.layers.utils import get_layer_cache

        last_state = get_layer_cache(module, past_key_values)
    if last_state is not None:
        raise UnsupportedModelError(
            f"headlab's torch path for fla's {type(module).__name__} cannot continue from a cached recurrent state "
            "(its implicit pattern covers only the current tokens): run the whole prefix with use_cache=False, "
            "e.g. generate(..., use_cache=False)")
    x = hidden_states
    if key_mask is not None:
        x = x * key_mask[..., None].to(x.dtype)  # padded tokens write nothing (fla drops them)
    # the mixer holds float32 copies of what fla's kernels load (they compute in float32, the scale included)
    if module.kind == "gla":
        q, k, v, g, beta, conv_in = _gla_inputs(module, x)
        fq, fk, g = q.float() * module.head_k_dim ** -0.5, k.float(), g.float()
    else:
        q, k, v, g, beta, conv_in = _deltanet_inputs(module, x)
        normed = _l2norm if module.qk_norm == "l2" else _sum_norm
        fq, fk, beta = normed(q).float() * module.head_k_dim ** -0.5, normed(k).float(), beta.float()
    if key_mask is not None:
        km = key_mask[:, None, :].to(fk.dtype)  # [B, 1, T]
        fk = fk * km[..., None]
        g = g * km[..., None] if g is not None else None
    mixer = LinearMixer(kind=module.kind, fq=fq, fk=fk, g=g, beta=beta)
    z = _mix(module, q, k, v, mixer, key_mask)  # [B, T, H, Dv], headlab's z
    o = _output(module, z, hidden_states)
    if key_mask is not None:
        o = o * key_mask[..., None].to(o.dtype)  # fla's repad leaves zeros at padded positions
    if use_cache and past_key_values is not None:
        _write_cache(module, past_key_values, mixer, v, conv_in, key_mask, T)
    return o, None, past_key_values


def _key_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """Bool `[B, T]` (True = real token) from fla's 0/1 padding mask; None when every token is real."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, T):
        raise UnsupportedModelError(f"fla layers take a [batch, seq_len] 0/1 padding mask; got shape "
                                    f"{tuple(attention_mask.shape)} for an input of {B}×{T} tokens")
    mask = attention_mask.bool()
    # fla unpads each row into one contiguous sequence; zeroing padded tokens is the same only when the
    # real tokens of a row are contiguous (right or left padding)
    starts = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0].long()
    if bool((starts > 1).any()):
        raise UnsupportedModelError("headlab's fla adapter supports right- or left-padded masks only (each row's "
                                    "real tokens contiguous)")
    return None if bool(mask.all()) else mask


def _conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fla's ShortConvolution (depthwise causal conv1d, optional SiLU) on `[B, T, D]`."""
    T = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=conv.kernel_size[0] - 1,
                 groups=conv.weight.shape[0])[..., :T].transpose(1, 2)
    return F.silu(y) if conv.activation in ("silu", "swish") else y


def _heads(t: torch.Tensor, d: int, repeat: int = 1) -> torch.Tensor:
    """`[B, T, (h d)]` → `[B, h·repeat, T, d]`, each head repeated `repeat` times in place (fla's `(h g)`)."""
    B, T, _ = t.shape
    t = t.view(B, T, -1, d)
    if repeat > 1:
        t = t.repeat_interleave(repeat, dim=2)
    return t.transpose(1, 2)


def _gla_inputs(m: nn.Module, x: torch.Tensor):
    qx, kx, vx = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    conv_in = (qx, kx, vx) if m.use_short_conv else None
    if m.use_short_conv:
        qx, kx, vx = _conv(m.q_conv1d, qx), _conv(m.k_conv1d, kx), _conv(m.v_conv1d, vx)
    gk = m.gk_proj(x)
    q = _heads(qx, m.head_k_dim)
    k = _heads(kx, m.head_k_dim, m.num_kv_groups)
    gk = _heads(gk, m.head_k_dim, m.num_kv_groups)
    v = _heads(vx, m.head_v_dim, m.num_kv_groups)
    gk = F.logsigmoid(gk) / m.gate_logit_normalizer
    if m.clamp_min is not None:
        gk = torch.clamp_min(gk, m.clamp_min)
    return q, k, v, gk, None, conv_in


def _deltanet_inputs(m: nn.Module, x: torch.Tensor):
    qx, kx, vx = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    conv_in = (qx, kx, vx) if m.use_short_conv else None
    if m.use_short_conv:
        q, k, v = _conv(m.q_conv1d, qx), _conv(m.k_conv1d, kx), _conv(m.v_conv1d, vx)
    else:
        q, k, v = qx, kx, F.silu(vx)
        if m.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
    if m.qk_activation == "relu":
        q, k = q.relu(), k.relu()
    elif m.qk_activation == "elu":
        q, k = F.elu(q) + 1, F.elu(k) + 1
    q, k, v = _heads(q, m.head_k_dim), _heads(k, m.head_k_dim), _heads(v, m.head_v_dim)
    if m.use_beta:
        beta = m.b_proj(x).sigmoid().transpose(1, 2)  # [B, H, T]
    else:
        beta = torch.ones_like(q[..., 0])
    if m.allow_neg_eigval:
        beta = beta * 2.0
    return q, k, v, None, beta, conv_in


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + _L2_EPS)).to(x.dtype)


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=1, dim=-1, eps=_SUM_EPS).to(x)


def _visible(key_mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """Bool `[B, 1, T, T]` for the records (causal ∧ real key, each query sees itself), or None (plain causal)."""
    if key_mask is None:
        return None
    i = torch.arange(T, device=device)
    diag = i[None, :] == i[:, None]
    return ((i[None, :] <= i[:, None]) & key_mask[:, None, None, :]) | diag


def _mix(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mixer: LinearMixer,
         key_mask: torch.Tensor | None) -> torch.Tensor:
    """The mixer's output `[B, T, H, Dv]` through headlab's seam (or directly when the module is not wrapped)."""
    from headlab.capture import headlab_attention
    from headlab.models.linear.modeling import linear_attention_forward

    slot = module.__dict__.get("_headlab_slot")
    mask = _visible(key_mask, q.shape[2], q.device)
    scaling = module.head_k_dim ** -0.5
    if slot is None or slot.module_id != id(module):
        out, _ = linear_attention_forward(module, q, k, v, mask, mixer=mixer, scaling=scaling)
    else:
        out, _ = headlab_attention(module, q, k, v, mask, mixer=mixer, scaling=scaling, is_causal=True)
    return out


def _rms(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32 (fla's kernels compute in float32)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def _gated_rms(norm: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """fla's FusedRMSNormGated: RMSNorm(x)·w·act(g), in float32, returned in x's dtype."""
    y = _rms(x, norm.weight, norm.bias, norm.eps) * _GATES[norm.activation](g.float())
    return y.to(x.dtype)


def _output(m: nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """fla's output norm / gate and o_proj on the mixer output z `[B, T, H, Dv]`."""
    B, T = z.shape[:2]
    if m.kind == "gla":
        if m.use_output_gate:
            g = m.g_proj(x)
            if m.fuse_norm_and_gate:
                o = _gated_rms(m.g_norm_swish_gate, z, g.view(B, T, -1, m.head_v_dim)).reshape(B, T, -1)
            else:
                o = _rms(z, m.g_norm.weight, m.g_norm.bias, m.g_norm.eps).to(z.dtype).reshape(B, T, -1)
                o = o * _fla_gates()[m.gate_fn](g)
        else:
            o = _rms(z, m.g_norm.weight, m.g_norm.bias, m.g_norm.eps).to(z.dtype).reshape(B, T, -1)
    else:
        if m.use_gate:
            g = m.g_proj(x).view(B, T, -1, m.head_v_dim)
            o = _gated_rms(m.o_norm, z, g)
        else:
            o = _rms(z, m.o_norm.weight, m.o_norm.bias, m.o_norm.eps).to(z.dtype)
        o = o.reshape(B, T, -1)
    return m.o_proj(o)


def _last_inputs(x: torch.Tensor, key_mask: torch.Tensor | None, width: int) -> torch.Tensor:
    """fla's short-conv cache `[B, D, W]`: each row's last W (masked) inputs up to its last real token."""
    B, T, D = x.shape
    end = torch.full((B,), T, device=x.device) if key_mask is None else \
        T - key_mask.flip(1).long().argmax(1)  # one past the last real token
    padded = torch.cat([x.new_zeros(B, width, D), x], dim=1)
    idx = end[:, None] + torch.arange(width, device=x.device)[None]  # in padded coordinates: end-W+1..end
    return padded.gather(1, idx[..., None].expand(-1, -1, D)).transpose(1, 2).contiguous()


def _write_cache(module: nn.Module, cache: Any, mixer: LinearMixer, v: torch.Tensor, conv_in, key_mask, T: int) -> None:
    """The final recurrent (and conv) states in fla's layouts, as fla's forward writes them with use_cache."""
    from fla.layers.utils import update_layer_cache

    with torch.no_grad():
        if mixer.kind == "gla":
            state = mixer.state(v)  # [N, H, K, V]
            fused_chunk = T > 64 and module.mode == "fused_chunk"  # the one GLA kernel fla calls without state_v_first
            if not fused_chunk:
                state = state.transpose(-1, -2).contiguous()  # fla's GLA layer keeps [N, H, V, K]
        else:
            state = mixer.state(v)  # [N, H, K, V], the layout fla's DeltaNet keeps
        conv_state = None
        if module.use_short_conv:
            W = module.q_conv1d.kernel_size[0]
            conv_state = tuple(_last_inputs(t, key_mask, W) for t in conv_in)
    update_layer_cache(module, cache, recurrent_state=state, conv_state=conv_state, offset=T)


# CPU fallbacks for fla's other Triton modules


def torch_fallbacks(model: nn.Module) -> nn.Module:
    """Give fla's Triton-only non-attention modules (RMSNorm, GatedMLP) pure-torch forwards (instance-level).

    fla's blocks use its fused RMSNorm (with the `(x, residual, prenorm=True)` residual-add form) and a
    SwiGLU GatedMLP whose kernels run only on a GPU; with these fallbacks a whole fla model runs on CPU.
    On CUDA tensors the fallbacks call fla's own forwards. The attention layers are left alone (wrapping
    attaches them). Idempotent; returns the model.
    """
    from fla.modules import GatedMLP, RMSNorm

    for mod in model.modules():
        if "_headlab_torch_fallback" in mod.__dict__:
            continue
        if type(mod) is RMSNorm:
            mod._headlab_fla_forward = mod.forward
            mod.forward = types.MethodType(_rmsnorm_forward, mod)
        elif type(mod) is GatedMLP:
            if mod.hidden_act not in ("swish", "silu"):
                raise UnsupportedModelError(f"no torch fallback for fla's GatedMLP with hidden_act={mod.hidden_act!r}")
            mod._headlab_fla_forward = mod.forward
            mod.forward = types.MethodType(_mlp_forward, mod)
        else:
            continue
        mod._headlab_torch_fallback = True
    return model


def _rmsnorm_forward(self: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False,
                     residual_in_fp32: bool = False):
    if x.is_cuda:
        return self._headlab_fla_forward(x, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    xf = x.float() if residual is None else x.float() + residual.float()
    y = _rms(xf, self.weight, self.bias, self.eps).to(x.dtype)
    if not prenorm:
        return y
    res_dtype = torch.float32 if residual_in_fp32 else (residual.dtype if residual is not None else x.dtype)
    return y, xf.to(res_dtype)


def _mlp_forward(self: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    if x.is_cuda:
        return self._headlab_fla_forward(x, **kwargs)
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


if importlib.util.find_spec("fla") is not None:
    register_fla()
