"""The capture seam: headlab's attention function, registered with transformers' AttentionInterface.

Every attention module of a wrapped HF model calls `headlab_attention` with post-RoPE
q `[B, H, Q, D]`, k and v `[B, G, S, D]` and the model's mask. With nothing active it
calls the model's own backend (sdpa or eager) unchanged. Inside a `capture` or an edit
scope it records what was asked for and applies the head edits of that scope.

Scopes live in a ContextVar, so they are private to the thread (or asyncio task) that
opened them: two threads editing different heads of one shared model never see each
other's edits, and nothing outlives its `with` block.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headlab.errors import EditError
from headlab.heads import heads_per_group
from headlab_kernels.head_stats.fused import attention_with_stats

IMPLEMENTATION = "headlab"


@dataclass
class LayerRecord:
    """What one attention layer saw in one forward call.

    Attributes:
        layer: layer index.
        q: post-RoPE queries `[B, H, Q, D]`.
        k: post-RoPE keys `[B, G, S, D]` (G KV groups).
        v: values `[B, G, S, D]`.
        mask: the model's mask as given to the backend: bool `[B|1, 1, Q, S]` (True = may attend),
            an additive float mask, or None (then `causal` decides).
        causal: whether the module is causal.
        scale: the softmax scale applied to q·k.
        z: the per-head output that enters the output projection, `[B, Q, H, D]`, after edits.
        mixer: for a linear-attention layer, what it mixes with (feature-mapped q/k, decays, β: a
            `headlab.models.linear.LinearMixer`); its implicit pattern replaces softmax(q·k). None for softmax.
        lse: `[B, H, Q]` float32 row log-sum-exp of the scaled scores, when a capture asked for it (`with_lse`) and
            the layer's output came from the fused CPU kernel that returns it (`headlab_kernels.head_stats.fused`).
        gates: `[B, Q, H]` the mixture-of-head routing gates of this forward (0 = the head is off for that token):
            a MoH layer's own gates (it multiplies its heads' outputs by them after the seam, so `z` is before
            them) times those of `Gate` edits (applied in the seam, so `z` is after them); None when nothing routes.
        x: the attention module's input hidden states `[B, Q, C]`, given to `Gate` functions that ask for it
            (`Gate.needs_input`); None in captures.
        key_bias: `[B|1, G, Q, S]` float32 additive per-KV-group bias of each key slot when the keys come from a
            compressed cache (`headlab.edits.RazorCache`: its KV heads hold different key sets, padded, and a
            compensation slot whose logit gets + log|D|): −inf where a slot may not be attended, else the bias; the
            pattern adds it (then `mask` is None: the bias holds causality too). None otherwise.
        fused: the statistics a capture asked to ride on the fused call (`Capture.fused_stats`), as
            `headlab_kernels.head_stats.fused.attention_with_stats` returns them ("lse", "entropy", "set_mass",
            "received", "topk_idx" / "topk_weight"); None where the fused route did not run.
        fused_route: which fused route computed the output and `fused`: "flash" (ATen's CPU flash kernel, the one
            sdpa runs), "kernel" (headlab's compiled one-sweep CPU kernel) or "triton" (CUDA); None where none ran.
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float
    z: torch.Tensor | None = None
    mixer: Any = None
    lse: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    x: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    fused: dict[str, torch.Tensor] | None = None
    fused_route: str | None = None

    @property
    def linear(self) -> bool:
        """Whether this is a linear-attention layer (its pattern is implicit, not a softmax)."""
        return self.mixer is not None

    def visible(self) -> torch.Tensor:
        """Bool `[B|1, 1, Q, S]`: which keys each query may attend to."""
        return visible_mask(self.mask, causal=self.causal, q_len=self.q.shape[2], k_len=self.k.shape[2],
                            device=self.q.device)

    def visible_pairs(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bool `[B|1, P]`: whether query q_pos[p] may see key k_pos[p] (O(P), no T×S mask is built)."""
        if self.mask is None:
            if self.causal and self.q.shape[2] > 1:
                return (k_pos <= q_pos + (self.k.shape[2] - self.q.shape[2]))[None]
            return torch.ones(1, len(q_pos), dtype=torch.bool, device=q_pos.device)
        mask = self.mask if self.mask.dtype == torch.bool else self.mask > torch.finfo(self.mask.dtype).min / 2
        return mask[:, 0, q_pos, k_pos]

    def pattern(self, heads: list[int] | None = None, rows: slice | None = None) -> torch.Tensor:
        """Float32 attention pattern `[B, h, Q, S]` of the given query heads (all when None).

        Softmax layers: softmax(q·k·scale) over the visible keys. Linear layers: the implicit matrix the
        layer applies to v (`pattern @ v` is the layer's output; see headlab.models.linear.mixer).
        `rows` restricts the query rows.
        """
        if self.mixer is not None:
            return self.mixer.pattern(heads, rows=rows)
        bias = self.key_bias
        if rows is None:
            return attention_pattern(self.q, self.k, self.visible(), self.scale, heads=heads, bias=bias)
        return attention_pattern(self.q[:, :, rows], self.k, self.visible()[:, :, rows], self.scale, heads=heads,
                                 bias=None if bias is None else bias[:, :, rows])


@dataclass
class Capture:
    """A request to record layers during forwards.

    Attributes:
        layers: layers to record (None: all).
        keep: keep each layer's latest LayerRecord in `records`.
        callback: called with each LayerRecord as it is made (for reductions that discard it).
        with_z: also record the per-head output z.
        with_lse: ask for each row's log-sum-exp from the attention call itself: where the backend is sdpa and the
            fused CPU kernel applies, the seam computes the layer's output with that kernel (the kernel sdpa runs,
            so the same output) and records its lse; elsewhere `record.lse` stays None.
        fused_stats: with `with_lse`, further statistics to compute in that same call where it applies
            ("entropy", "key_sets", "received", "topk"; see `attention_with_stats`), recorded in `record.fused`.
        topk: how many top keys per row for "topk".
        route: the fused route to take: "auto", "flash", "kernel" or "triton" (`attention_with_stats`).
        key_sets: bool `[K, B, S]` key sets for "key_sets" (the batch's own positions).
        query_mask: bool `[B, T]` the batch's real tokens, for "received" (a padded query gives nothing; without
            it, queries that see no key count as padded).
        device: where records go (kept and given to `callback`): a model spread over devices by a device map gathers
            every layer's record on its input device; None leaves each on its layer's device.
    """

    layers: frozenset[int] | None = None
    keep: bool = True
    callback: Callable[[LayerRecord], None] | None = None
    with_z: bool = False
    with_lse: bool = False
    fused_stats: frozenset[str] = frozenset()
    topk: int = 1
    route: str = "auto"
    key_sets: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    device: torch.device | None = None
    records: dict[int, LayerRecord] = field(default_factory=dict)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


OverrideFn = Callable[["LayerRecord", tuple[int, ...]], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class HeadOverride:
    """Recompute some heads' outputs of a layer from their q, k, v (the one hook for attention-level edits).

    `fn(record, heads)` gets the layer's LayerRecord (q, k, v, mask, scale; no z) and the query heads,
    and returns their outputs `[B, Q, h, D]` and, optionally, their new patterns `[B, h, Q, S]` (used
    only where the backend returns attention weights; None leaves NaN there). Uniform ablation, ACT
    calibration and per-head KV-cache policies are overrides.
    """

    heads: tuple[int, ...]
    fn: OverrideFn
    name: str = "override"


GateFn = Callable[["LayerRecord"], torch.Tensor]


@dataclass(frozen=True)
class Gate:
    """Per-token head gates of one layer (mixture-of-head routing as an edit): `fn(record)` gets the layer's
    LayerRecord (q, k, v, mask, scale and, when `needs_input`, `x`: the module's input hidden states) and returns
    gates `[B, Q, H]` that multiply every head's output (1 keeps it exactly, 0 turns it off for that token).

    `routed`: the layer's attention is computed by `headlab_kernels.routed_attention` for the rows that are on only
    (the work of heads that are off is skipped), where it applies — a causal prefill with no mask or a causal
    key-padding mask, no attention override, no linear mixer, no lse capture; elsewhere the backend computes every
    row and the gates multiply them (the same output to float tolerance)."""

    fn: GateFn
    needs_input: bool = False
    name: str = "gate"
    routed: bool = False  # compute only the (token, head) rows that are on (headlab_kernels.routed_attention)


@dataclass(frozen=True)
class LayerOps:
    """The merged head edits of one layer: attention overrides, then gates, output scales, additions and replacements.

    `add` entries are `(head, delta)`: `delta` (`[D]` or `[B|1, Q, D]`) is added to the head's output `[B, Q, D]`
    (a steering vector; attribution patching adds a zero tensor that requires grad, so ∂metric/∂z flows to it while
    the head's own output keeps its graph). `replace` entries are `(head, value, where)`: the head's output becomes
    `value` (broadcast to it: a `[D]` mean, or `[B|1, Q, D]` values from another run) where the bool `where`
    `[B|1, Q]` is True (everywhere when None); later entries act on what earlier ones left.
    """

    overrides: tuple[HeadOverride, ...] = ()
    scale: tuple[tuple[int, float], ...] = ()
    replace: tuple[tuple[int, torch.Tensor, torch.Tensor | None], ...] = ()
    add: tuple[tuple[int, torch.Tensor], ...] = ()
    gates: tuple[Gate, ...] = ()

    def merged(self, other: "LayerOps") -> "LayerOps":
        """These ops (outer) followed by `other` (an inner scope's): attention-level overrides act first, then the
        output-level edits compose in nesting order — an inner scale multiplies an outer replacement (e.g. a mean
        ablation) and an outer addition, an inner addition adds to an outer replacement too, an inner replacement
        wins over outer scales, additions and replacements of the same head where it applies."""
        scales = dict(self.scale)
        replace = list(self.replace)
        add = list(self.add)
        for head, factor in other.scale:
            scales[head] = scales.get(head, 1.0) * factor
            replace = [(h, v * factor if h == head else v, w) for h, v, w in replace]
            add = [(h, d * factor if h == head else d) for h, d in add]
        for head, delta in other.add:
            replace = [(h, v + delta if h == head else v, w) for h, v, w in replace]
            add.append((head, delta))
        for head, vec, where in other.replace:
            if where is None:  # covers every position: what came before for this head no longer shows
                replace = [r for r in replace if r[0] != head]
                add = [a for a in add if a[0] != head]
                scales.pop(head, None)
            replace.append((head, vec, where))
        return LayerOps(self.overrides + other.overrides, tuple(sorted(scales.items())), tuple(replace), tuple(add),
                        self.gates + other.gates)


@dataclass(frozen=True)
class _Active:
    captures: tuple[Capture, ...] = ()
    ops: tuple[tuple[int, LayerOps], ...] = ()
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → its module's input, for Gate edits

    def ops_for(self, layer: int) -> LayerOps | None:
        for idx, ops in self.ops:
            if idx == layer:
                return ops
        return None


_EMPTY: dict[int, _Active] = {}
_STATE: ContextVar[dict[int, _Active]] = ContextVar("headlab_active", default=_EMPTY)


@dataclass
class LayerSlot:
    """Attached to each attention module as `_headlab_slot`: which model and layer it is, and its backend."""

    owner: int
    layer: int
    base: Callable
    base_name: str
    module_id: int


def _merge_ops(old: tuple[tuple[int, LayerOps], ...], new: dict[int, LayerOps]) -> tuple[tuple[int, LayerOps], ...]:
    merged = dict(old)
    for layer, ops in new.items():
        merged[layer] = merged[layer].merged(ops) if layer in merged else ops
    return tuple(sorted(merged.items(), key=lambda kv: kv[0]))


@contextmanager
def activate(owner: int, *, capture: Capture | None = None, ops: dict[int, LayerOps] | None = None,
             isolated: bool = False) -> Iterator[None]:
    """Make a capture and/or head edits active for model `owner` in this context, until the block exits.

    Private to the seam's owners (this module, HeadModel, edits): everyone else goes through `hl.edit`,
    `HeadModel.run / stats / capturing`. `isolated`: the outer scopes' captures and edits do not apply inside.
    """
    current = _STATE.get()
    state = _Active() if isolated else current.get(owner, _Active())
    state = _Active(
        captures=state.captures + ((capture,) if capture is not None else ()),
        ops=_merge_ops(state.ops, ops or {}),
    )
    token = _STATE.set({**current, owner: state})
    try:
        yield
    finally:
        _STATE.reset(token)


def input_hook(owner: int, layer: int) -> Callable:
    """A forward pre-hook (with kwargs) for layer `layer`'s attention module: when an active `Gate` of that layer
    asks for the module's input, it keeps the hidden states for the seam (in this context's scope only)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state = _STATE.get().get(owner)
        if state is None:
            return
        ops = state.ops_for(layer)
        if ops is None or not any(g.needs_input for g in ops.gates):
            return
        x = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(x, torch.Tensor):
            state.inputs[layer] = x

    return hook


def fit_positions(where: torch.Tensor, batch: int, length: int, what: str) -> torch.Tensor:
    """A bool positions mask `[B|1, T']` widened with False (or cut, when nothing is set past the end) to
    `[B|1, length]`; EditError when it does not fit the forward."""
    if where.shape[0] not in (1, batch):
        raise EditError(f"a positions mask for {where.shape[0]} prompts on a batch of {batch}")
    if where.shape[1] < length:
        return torch.cat([where, where.new_zeros(where.shape[0], length - where.shape[1])], dim=1)
    if where.shape[1] > length:
        if bool(where[:, length:].any()):
            raise EditError(f"positions past the {length} {what} of this forward")
        return where[:, :length]
    return where


def is_active(owner: int) -> bool:
    """Whether any capture or head edit is active for model `owner` in this context."""
    return _STATE.get().get(owner) is not None


def active_ops(owner: int) -> dict[int, LayerOps]:
    """The head edits active for model `owner` in this context."""
    state = _STATE.get().get(owner)
    return dict(state.ops) if state else {}


def visible_mask(mask: torch.Tensor | None, *, causal: bool, q_len: int, k_len: int,
                 device: torch.device) -> torch.Tensor:
    """Bool `[B|1, 1, Q, S]` from an sdpa-style mask (bool or None) or an additive float mask."""
    if mask is None:
        if causal and q_len > 1:
            rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
            return (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def attention_pattern(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, scale: float,
                      heads: list[int] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention pattern in float32.

    Args:
        q: `[B, H, Q, D]`; k: `[B, G, S, D]` with H a multiple of G (grouped-query attention).
        visible: bool `[B|1, 1, Q, S]`.
        heads: query heads to compute (all when None).
        bias: optional additive per-KV-group bias `[B|1, G, Q, S]` (−inf: not visible), see `LayerRecord.key_bias`.
    Returns:
        `[B, h, Q, S]`; a row with no visible key is all zeros.
    """
    n_heads, n_groups = q.shape[1], k.shape[1]
    idx = torch.arange(n_heads, device=q.device) if heads is None else torch.as_tensor(heads, device=q.device)
    groups = idx // heads_per_group(n_heads, n_groups)
    qh = q.index_select(1, idx).float()
    kh = k.index_select(1, groups).float()
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.index_select(1, groups).float()
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def _bias_mask(key_bias: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """A compressed cache's per-KV-group key bias `[B|1, G, Q, S]` as the additive mask `[B|1, H, Q, S]` a backend
    takes (its query heads repeat their group's row; −inf becomes the dtype's lowest finite value)."""
    per = heads_per_group(query.shape[1], key_bias.shape[1])
    bias = key_bias.repeat_interleave(per, dim=1).to(query.dtype)
    return bias.clamp_min(torch.finfo(query.dtype).min)


def _additive(mask: torch.Tensor | None, *, causal: bool, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The additive float mask an eager backend expects, from the sdpa-style mask headlab asks for."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    if mask is None and not (causal and query.shape[2] > 1):
        return None
    vis = visible_mask(mask, causal=causal, q_len=query.shape[2], k_len=key.shape[2], device=query.device)
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(vis, zero, torch.finfo(query.dtype).min)


def attend(record: LayerRecord, heads: tuple[int, ...] | list[int],
           transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention of some heads, optionally with their pattern transformed first.

    Returns outputs `[B, Q, h, D]` (in v's dtype) and the patterns used `[B, h, Q, S]` (float32).
    """
    pattern = record.pattern(list(heads))
    if transform is not None:
        pattern = transform(pattern)
    groups = torch.as_tensor(list(heads), device=record.v.device) // (record.q.shape[1] // record.v.shape[1])
    v = record.v.index_select(1, groups).float()  # [B, h, S, D]
    return torch.matmul(pattern, v).transpose(1, 2).to(record.v.dtype), pattern


def uniform_attention(record: LayerRecord, heads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Override: each head attends uniformly to the keys it may see."""
    weights = record.visible()[:, 0].to(torch.float32)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)  # [B|1, Q, S]
    pattern = weights[:, None].expand(-1, len(heads), -1, -1)
    groups = torch.as_tensor(list(heads), device=record.v.device) // (record.q.shape[1] // record.v.shape[1])
    v = record.v.index_select(1, groups).float()
    return torch.matmul(pattern, v).transpose(1, 2).to(record.v.dtype), pattern


def headlab_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs):
    """The attention function transformers calls for `attn_implementation="headlab"`."""
    slot: LayerSlot | None = module.__dict__.get("_headlab_slot")
    if slot is not None and slot.module_id != id(module):  # a deep copy of a wrapped module: not ours
        slot = None
    base = slot.base if slot is not None else sdpa_attention_forward
    causal = bool(kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True))
    base_mask = attention_mask
    if slot is not None and slot.base_name == "eager":
        base_mask = _additive(attention_mask, causal=causal, query=query, key=key)
    state = _STATE.get().get(slot.owner) if slot is not None else None
    key_bias = getattr(key, "headlab_key_bias", None)  # [B|1, G, Q, S] from a compressed cache (RazorCache)
    if key_bias is not None:  # it encodes causality and each KV head's own key set: it replaces the model's mask
        attention_mask = None
        base_mask = _bias_mask(key_bias, query)
    mixer = kwargs.get("mixer")  # a linear layer's feature maps / decays (its backend mixes with them)
    gates = kwargs.pop("gates", None)  # a MoH layer's own routing gates [B, Q, H] (it applies them itself)
    layer_ops = state.ops_for(slot.layer) if state is not None else None
    gate_values = None
    if layer_ops is not None and layer_ops.gates:  # routing comes from q/k/v (or the module's input): before attention
        scale0 = kwargs.get("scaling")
        gate_values = _gates(layer_ops.gates, state, module, slot.layer, query, key, value, attention_mask, causal,
                             float(scale0) if scale0 is not None else query.shape[-1] ** -0.5, mixer)
    routed_out = None
    if gate_values is not None and any(g.routed for g in layer_ops.gates) and not layer_ops.overrides \
            and mixer is None and key_bias is None \
            and not any(c.with_lse and c.wants(slot.layer) for c in state.captures):
        routed_out = _routed(query, key, value, attention_mask, gate_values[1], kwargs, causal)
    fused = None
    fused_caps = [c for c in state.captures if c.with_lse and c.wants(slot.layer)] if state is not None else []
    if (fused_caps and mixer is None and base is sdpa_attention_forward and routed_out is None
            and key_bias is None):
        fused = _sdpa_with_stats(module, query, key, value, attention_mask, kwargs, fused_caps)
    lse = fused_stats = fused_route = None
    if fused is not None:  # the output and the rows' lse (and what else was asked) from one kernel call
        out, fused_stats, fused_route = fused
        lse = fused_stats["lse"]
        weights = None
    elif routed_out is not None:
        out, weights = routed_out, None
    else:
        out, weights = base(module, query, key, value, base_mask, **kwargs)
    if state is None:
        return out, weights

    layer = slot.layer
    scale = kwargs.get("scaling")
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    ops = state.ops_for(layer)
    if ops is not None:
        n_heads = query.shape[1]
        if ops.overrides:
            inputs = LayerRecord(layer=layer, q=query, k=key, v=value, mask=attention_mask, causal=causal, scale=scale,
                                 mixer=mixer, key_bias=key_bias)
            out = out.clone()
            for override in ops.overrides:
                heads = list(override.heads)
                new_out, new_weights = override.fn(inputs, override.heads)
                out[:, :, heads] = new_out.to(out.dtype)
                if weights is not None:
                    weights = weights.clone()
                    weights[:, heads] = (new_weights.to(weights.dtype) if new_weights is not None
                                         else float("nan"))
        if gate_values is not None:
            product, binary = gate_values
            gates = product if gates is None else gates * product
            if routed_out is None or not bool(((product == 0) | (product == 1)).all()):
                out = out * product.to(out.dtype)[..., None]  # the routed path already zeroed the heads that are off
        if ops.scale:
            mult = torch.ones(n_heads, dtype=out.dtype, device=out.device)
            for head, factor in ops.scale:
                mult[head] = factor
            out = out * mult[None, None, :, None]
        if ops.add:
            out = out.clone()
            for head, delta in ops.add:
                delta = delta.to(device=out.device, dtype=out.dtype)
                if delta.dim() == 3 and (delta.shape[0] not in (1, out.shape[0]) or delta.shape[1:] != out.shape[1::2]):
                    raise EditError(f"adding to L{layer}H{head}: a delta of shape {tuple(delta.shape)} does not fit "
                                    f"this forward's head output {(out.shape[0], out.shape[1], out.shape[3])}")
                out[:, :, head] = out[:, :, head] + delta
        if ops.replace:
            out = out.clone()
            for head, vec, where in ops.replace:
                vec = vec.to(device=out.device, dtype=out.dtype)
                if vec.dim() == 3 and (vec.shape[0] not in (1, out.shape[0]) or vec.shape[1:] != out.shape[1::2]):
                    raise EditError(f"patching L{layer}H{head}: values of shape {tuple(vec.shape)} do not fit this "
                                    f"forward's head output {(out.shape[0], out.shape[1], out.shape[3])} ([B, T, D])")
                if where is None:
                    out[:, :, head] = vec
                else:
                    where = fit_positions(where, out.shape[0], out.shape[1], "queries").to(out.device)
                    out[:, :, head] = torch.where(where[..., None], vec, out[:, :, head])

    for cap in state.captures:
        if not cap.wants(layer):
            continue
        record = LayerRecord(
            layer=layer, q=query.detach(), k=key.detach(), v=value.detach(), mask=attention_mask,
            causal=causal, scale=scale, z=out.detach() if cap.with_z else None,
            mixer=_detached(mixer), lse=lse if cap.with_lse else None, fused=fused_stats if cap.with_lse else None,
            fused_route=fused_route if cap.with_lse else None,
            gates=gates.detach() if gates is not None else None, key_bias=key_bias,
        )
        if cap.device is not None and query.device != cap.device:
            record = _moved(record, cap.device)
        if cap.keep:
            cap.records[layer] = record
        if cap.callback is not None:
            cap.callback(record)
    return out, weights


def _gates(gates: tuple[Gate, ...], state: _Active, module: torch.nn.Module, layer: int, query: torch.Tensor,
           key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float,
           mixer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The product of a layer's Gate edits `[B, Q, H]` and whether each (token, head) is on (bool)."""
    x = state.inputs.pop(layer, None)
    record = LayerRecord(layer=layer, q=query, k=key, v=value, mask=mask, causal=causal, scale=scale, mixer=mixer, x=x)
    product = None
    shape = (query.shape[0], query.shape[2], query.shape[1])
    for gate in gates:
        if gate.needs_input and x is None:
            raise EditError(f"{gate.name} on layer {layer} routes from the attention module's input, which "
                            f"{type(module).__name__} was not called with (no hidden_states argument)")
        g = gate.fn(record)
        if tuple(g.shape) != shape:
            raise EditError(f"{gate.name} on layer {layer} gave gates of shape {tuple(g.shape)}, not {shape} "
                            "([B, Q, H])")
        product = g if product is None else product * g
    return product, product != 0


def _routed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, on: torch.Tensor,
            kwargs: dict, causal: bool) -> torch.Tensor | None:
    """The layer's output `[B, Q, H, D]` from the routed kernel (only the rows that are on; the others 0), or None
    where it does not apply: not a causal prefill, a mask that is more than causal + key padding, softcap, bias."""
    from headlab_kernels.routed_attention import routed_attention

    q_len, k_len = query.shape[2], key.shape[2]
    if not causal or q_len != k_len or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None \
            or kwargs.get("sliding_window") is not None or float(kwargs.get("dropout", 0.0) or 0.0) > 0:
        return None
    key_mask = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (q_len, k_len):
            return None
        key_mask = mask[:, 0].any(-2)  # [B|1, S]: the keys some query may see
        expected = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril()[None] & key_mask[:, None, :]
        if not torch.equal(mask[:, 0], expected):
            return None
        key_mask = key_mask.expand(query.shape[0], k_len)
    scale = kwargs.get("scaling")
    out = routed_attention(query, key, value, on.to(query.dtype), scale=float(scale) if scale is not None else None,
                           key_mask=key_mask)
    return out.to(query.dtype)


def _sdpa_with_stats(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, kwargs: dict, captures: list[Capture]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], str] | None:
    """transformers' sdpa attention (`sdpa_attention_forward`) through a fused CPU route that also returns each
    row's lse and the statistics the captures ask for: (output `[B, Q, H, D]`, {"lse" `[B, H, Q]`, ...}, the route
    that ran), or None where no route applies."""
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or module.training:
        return None
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:  # sdpa_attention_forward cuts the keys here: leave it to the backend
        return None
    if float(kwargs.get("dropout", 0.0) or 0.0):
        return None
    wanted = frozenset().union(*(c.fused_stats for c in captures))
    sets = next((c.key_sets for c in captures if c.key_sets is not None), None) if "key_sets" in wanted else None
    query_mask = next((c.query_mask for c in captures if c.query_mask is not None), None)
    if query_mask is not None:
        query_mask = query_mask[:, -q_len:].to(query.device)
    elif "received" in wanted and attention_mask is not None:  # the real queries: rows that see some key
        query_mask = visible_mask(attention_mask, causal=False, q_len=q_len, k_len=kv_len,
                                  device=query.device)[:, 0].any(-1).expand(query.shape[0], q_len)
    topk = max((c.topk for c in captures if "topk" in c.fused_stats), default=0)
    res = attention_with_stats(query, key, value, mask=attention_mask, causal=is_causal, scale=kwargs.get("scaling"),
                               entropy="entropy" in wanted, received="received" in wanted, query_mask=query_mask,
                               key_sets=None if sets is None else sets[:, :, -kv_len:].to(query.device), topk=topk,
                               route=next((c.route for c in captures if c.route != "auto"), "auto"))
    if res is None:
        return None
    return res.out.transpose(1, 2).contiguous(), res.stats, res.route


def _moved(record: LayerRecord, device: torch.device) -> LayerRecord:
    """A record with its tensors (mixer's and fused statistics' included) on another device."""
    import dataclasses

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.replace(value, **{f.name: move(getattr(value, f.name))
                                                 for f in dataclasses.fields(value) if f.init})
        return value

    return dataclasses.replace(record, **{f.name: move(getattr(record, f.name)) for f in dataclasses.fields(record)})


def _detached(mixer: Any) -> Any:
    """A copy of a linear layer's mixer with its tensors detached (records never hold the autograd graph)."""
    if mixer is None:
        return None
    import dataclasses

    return dataclasses.replace(mixer, **{f.name: getattr(mixer, f.name).detach() for f in dataclasses.fields(mixer)
                                         if isinstance(getattr(mixer, f.name), torch.Tensor)})


def eager_function_for(module: torch.nn.Module) -> Callable:
    """The model family's own eager attention function (its modeling file's `eager_attention_forward`)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def ensure_registered() -> None:
    """Register `attn_implementation="headlab"` with transformers (idempotent; done when a model is wrapped)."""
    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, headlab_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
