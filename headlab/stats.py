"""Long-context head statistics: per-query and per-key summaries of every pattern, never the T×T matrix.

For a linear-attention layer the same statistics are read off its implicit pattern, a block of query
rows at a time (`implicit_stats`).

`HeadModel.stats(...)` runs the model once and, layer by layer as the forward reaches it,
reduces q and k to `headlab_kernels.head_stats.HeadStats` (top-k keys, log-sum-exp, entropy,
key-set mass, attention received per key) and drops them. `pair_weights` turns a layer's
log-sum-exp into the exact weight of chosen (query, key) pairs in O(pairs · D).
"""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping

import torch

from headlab.capture import LayerRecord
from headlab.heads import HeadRef, heads_per_group
from headlab.run import Batch
from headlab_kernels.head_stats import HeadStats, head_stats

if TYPE_CHECKING:
    from headlab.models.head_model import HeadModel

Impl = Literal["auto", "triton", "torch", "reference"]


@dataclass
class StatsRun:
    """One forward with per-layer streaming statistics.

    Attributes:
        model: the HeadModel that ran.
        batch: the token batch.
        output: the HF output (logits for a causal LM).
        layers: per reduced layer, its HeadStats (`[B, H, ...]`, all query heads of the layer).
        extra: per layer, what a custom reducer returned (see `layer_stats`).
        paths: per layer, how its statistics were computed: "fused-lse", "fused-lse+entropy+received" and the like
            (the statistics named came with the layer's output from ATen's CPU flash kernel, received mass from one
            more flash call), "kernel-lse+entropy+received+topk" and the like (all of them with the output from one
            sweep of headlab's compiled CPU kernel; "triton-…" on CUDA) — statistics not named were not asked for
            and are NaN / empty — or the head-stats implementation that ran ("reference" / "triton" / "implicit" for
            linear layers).
    """

    model: "HeadModel"
    batch: Batch
    output: Any
    layers: dict[int, HeadStats]
    extra: dict[int, Any] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)

    def head(self, ref: HeadRef) -> dict[str, torch.Tensor]:
        """One head's statistics, with the head axis removed.

        Args:
            ref: the head (its layer must have been reduced in this run).

        Returns:
            {"topk_idx", "topk_weight": `[B, T, k]`; "lse", "entropy": `[B, T]`; "set_mass": `[B, T, K]`;
            "received": `[B, S]`; "n_visible": `[B, S]`}.

        Raises:
            HeadIndexError: a head out of the model's range.
            KeyError: the head's layer was not reduced in this run.
        """
        self.model.check_heads([ref])
        if ref.layer not in self.layers:
            raise KeyError(f"layer {ref.layer} was not reduced in this run; reduced: {sorted(self.layers)}")
        st = self.layers[ref.layer]
        return {"topk_idx": st.topk_idx[:, ref.head], "topk_weight": st.topk_weight[:, ref.head],
                "lse": st.lse[:, ref.head], "entropy": st.entropy[:, ref.head],
                "set_mass": st.set_mass[:, ref.head], "received": st.received[:, ref.head],
                "n_visible": st.n_visible}


    def token_view(self, layer: int | None = None, heads: Any = None, *, index: int = 0,
                   max_bytes: int | None = None):
        """The long-prompt token view (`HtmlView`) of batch item `index`.

        Tokens are coloured by each row's entropy, the attention each key receives or its column score; hover a token
        for its top-k keys (exact weights) and the queries that hold it among theirs. Needs statistics="all" (top-k
        and entropy); `m.stats(prompt, topk=8)` keeps 8 keys per query.

        Args:
            layer: show every head of this layer (when `heads` is None).
            heads: HeadRefs / "L1H2" strings, or head indices of `layer` (default: every head of `layer`, else of
                the first reduced layer).
            index: the batch item.
            max_bytes: the view's size budget (default: the statistics budget of `headlab.viz.html`).

        Returns:
            An HtmlView (shown inline in notebooks; `.html` is the page).

        Raises:
            HeadIndexError: heads out of range or of a layer this run did not reduce.
        """
        from headlab.views import stats_run_view

        return stats_run_view(self, layer, heads, index=index, max_bytes=max_bytes)

    def _repr_html_(self) -> str:
        from headlab.views import html_or_message

        return html_or_message(self.token_view)


def stack_key_sets(key_sets: torch.Tensor | Mapping[str, torch.Tensor], batch: Batch
                   ) -> tuple[torch.Tensor | None, tuple[str, ...]]:
    """Key sets in the fused route's form: bool `[K, B, S]` over the batch's positions, and their names.

    Args:
        key_sets: bool `[K, B|1, S]`, or {name: bool `[B|1, S]`} (as `head_stats` takes them).
        batch: the batch the sets refer to.

    Returns:
        (bool `[K, B, S]`, or None for no sets; the names when the sets came as a dict, else ()).

    Raises:
        ValueError: sets whose shape does not fit the batch.
    """
    n_b, n_s = batch.input_ids.shape
    if isinstance(key_sets, Mapping):
        names = tuple(key_sets)
        if not names:
            return None, ()
        sets = torch.stack([torch.as_tensor(key_sets[n]).to(torch.bool).expand(n_b, n_s) for n in names])
        return sets, names
    sets = torch.as_tensor(key_sets).to(torch.bool)
    if sets.dim() != 3 or sets.shape[1] not in (1, n_b) or sets.shape[2] != n_s:
        raise ValueError(f"key_sets must be [K, B|1, S] = [K, {n_b}|1, {n_s}]; got {tuple(sets.shape)}")
    return (sets.expand(-1, n_b, -1) if sets.shape[0] else None), ()


def fused_stats(record: LayerRecord, batch: Batch, set_names: tuple[str, ...] = ()) -> HeadStats:
    """HeadStats from what the fused kernel computed with the layer's output (`record.fused`).

    Args:
        record: the layer's record, with `fused` set by the seam ("lse", and "entropy", "set_mass", "received" where
            they were asked for).
        batch: the batch that ran (its mask marks padded queries and keys).
        set_names: names of the key sets, when they were given as a dict.

    Returns:
        HeadStats with what was computed (padded queries: lse -inf, entropy 0, set mass 0, no top keys; padded keys
        receive 0); n_visible `[B, S]` counted from the masks (O(S) for causal + padding); what was not asked for is
        NaN, and the top-k keys are empty unless asked for.
    """
    got = record.fused
    lse = got["lse"].float()
    n_b, n_h, n_q = lse.shape
    n_s = record.k.shape[2]
    dev = lse.device
    query_mask = batch.attention_mask.bool()[:, -n_q:].to(dev)
    key_mask = batch.attention_mask.bool()[:, -n_s:].to(dev)
    nan = float("nan")
    lse = lse.masked_fill(~query_mask[:, None], float("-inf"))
    entropy = got["entropy"].masked_fill(~query_mask[:, None], 0.0) if "entropy" in got else torch.full_like(lse, nan)
    empty = torch.zeros(n_b, n_h, n_q, 0, device=dev)
    set_mass = got["set_mass"].masked_fill(~query_mask[:, None, :, None], 0.0) if "set_mass" in got else empty.clone()
    if "received" in got:
        received = got["received"].masked_fill(~key_mask[:, None], 0.0)
        if record.mask is not None:  # the model's own mask (padding, a window): count what each real query sees
            vis = record.visible()[:, 0] & query_mask[:, :, None]  # [B|1, Q, S]
            n_visible = vis.sum(1).float().expand(n_b, n_s)
        elif record.causal and n_q == n_s:  # query i sees keys j <= i
            n_visible = query_mask.flip(-1).cumsum(-1).flip(-1).float()
        else:
            n_visible = query_mask.sum(-1, keepdim=True).float().expand(n_b, n_s)
        n_visible = n_visible * key_mask
    else:
        received = torch.full((n_b, n_h, n_s), nan, device=dev)
        n_visible = torch.full((n_b, n_s), nan, device=dev)
    topk_idx, topk_weight = empty.long(), empty
    if "topk_idx" in got:
        pad = ~query_mask[:, None, :, None]
        topk_idx = got["topk_idx"].masked_fill(pad, -1)
        topk_weight = got["topk_weight"].masked_fill(pad, 0.0)
    return HeadStats(topk_idx=topk_idx, topk_weight=topk_weight, lse=lse, entropy=entropy, set_mass=set_mass,
                     received=received, n_visible=n_visible, set_names=set_names)


def layer_stats(model: "HeadModel", record: LayerRecord, batch: Batch, *, topk: int = 1,
                key_sets: torch.Tensor | Mapping[str, torch.Tensor] | None = None, impl: Impl = "auto") -> HeadStats:
    """HeadStats of one captured layer, masking padding and causality from the batch.

    The model's own 4-D mask is used only where it says more than causal + padding (a sliding
    window); otherwise nothing of size T×S is read. A linear layer's statistics come from `implicit_stats`.

    Args:
        model: the HeadModel that ran.
        record: the layer's LayerRecord (q `[B, H, Q, D]`, k `[B, G, S, D]`).
        batch: the batch that ran (its attention mask gives the padding).
        topk: top keys to keep per query.
        key_sets: bool `[K, B|1, S]` or {name: bool `[B, S]`}: attention mass on each set per query.
        impl: "auto", "triton" or "torch" (`headlab_kernels.head_stats.head_stats`).

    Returns:
        HeadStats of every query head of the layer (`[B, H, ...]`).
    """
    key_mask = batch.attention_mask.bool()
    q_len, k_len = record.q.shape[2], record.k.shape[2]
    if record.linear:
        return implicit_stats(record, key_mask=key_mask[:, -k_len:], query_mask=key_mask[:, -q_len:],
                              key_sets=key_sets, topk=topk)
    mask = None
    if getattr(model.hf.config, "sliding_window", None) and record.mask is not None:
        mask = record.visible()
    return head_stats(record.q, record.k, scale=record.scale, causal=record.causal, mask=mask,
                      key_mask=key_mask[:, -k_len:], query_mask=key_mask[:, -q_len:] if q_len <= k_len else None,
                      key_sets=key_sets, topk=topk, impl=impl)


def implicit_stats(record: LayerRecord, *, key_mask: torch.Tensor, query_mask: torch.Tensor,
                   key_sets: torch.Tensor | Mapping[str, torch.Tensor] | None = None, topk: int = 1,
                   block_q: int = 128) -> HeadStats:
    """HeadStats of a linear layer's implicit pattern, built `block_q` query rows at a time.

    The same fields as for softmax heads, read off the matrix the layer applies to v: `topk` keys by
    weight (by |weight| for the signed GLA/DeltaNet patterns, whose value is reported), `entropy` of the
    row's |weights| normalised to sum 1, `set_mass` and `received` as sums of the (signed) weights, and
    `lse` NaN (there is no softmax normaliser). Memory is O(block_q · S) per head.

    Args:
        record: a linear layer's LayerRecord (its `mixer` holds the feature-mapped q and k).
        key_mask: bool `[B, S]`, True for real keys.
        query_mask: bool `[B, T]`, True for real queries.
        key_sets: bool `[K, B|1, S]` or {name: bool `[B, S]`}.
        topk: top keys to keep per query.
        block_q: query rows of the implicit pattern built at a time.

    Returns:
        HeadStats `[B, H, ...]` (lse NaN).
    """
    from headlab_kernels.head_stats.common import check_inputs

    q, k = record.mixer.fq, record.mixer.fk
    B, H, T, _ = q.shape
    S = k.shape[2]
    inp = check_inputs(q, k, mask=None, key_mask=key_mask, query_mask=query_mask, key_sets=key_sets, topk=topk)
    dev, f32 = q.device, torch.float32
    sets = inp.sets.to(f32).permute(1, 2, 0)[:, None] if inp.sets is not None else None  # [B|1, 1, S, K]
    kk = min(topk, S)
    topk_idx = torch.full((B, H, T, topk), -1, dtype=torch.int64, device=dev)
    topk_weight = torch.zeros(B, H, T, topk, dtype=f32, device=dev)
    entropy = torch.zeros(B, H, T, dtype=f32, device=dev)
    set_mass = torch.zeros(B, H, T, inp.n_sets, dtype=f32, device=dev)
    received = torch.zeros(B, H, S, dtype=f32, device=dev)
    n_visible = torch.zeros(B, S, dtype=f32, device=dev)
    cols = torch.arange(S, device=dev)
    for i0 in range(0, T, block_q):
        i1 = min(T, i0 + block_q)
        p = record.pattern(rows=slice(i0, i1)).float()  # [B, H, n, S]
        rows = torch.arange(i0, i1, device=dev) + (S - T)
        vis = (cols[None, :] <= rows[:, None])[None] & inp.key_mask[:, None, :] & inp.query_mask[:, i0:i1, None]
        p = p * vis[:, None]
        n_visible += vis.sum(1, dtype=f32)
        received += p.sum(2)
        mag = p.abs()
        top = mag.topk(kk, dim=-1).indices
        seen = vis[:, None].expand_as(p).gather(-1, top)
        topk_idx[:, :, i0:i1, :kk] = torch.where(seen, top, -1)
        topk_weight[:, :, i0:i1, :kk] = torch.where(seen, p.gather(-1, top), 0.0)
        w = mag / mag.sum(-1, keepdim=True).clamp_min(1e-30)
        entropy[:, :, i0:i1] = -(w * w.clamp_min(1e-30).log()).sum(-1)
        if sets is not None:
            set_mass[:, :, i0:i1] = torch.matmul(p, sets)
    lse = torch.full((B, H, T), float("nan"), dtype=f32, device=dev)
    return HeadStats(topk_idx=topk_idx, topk_weight=topk_weight, lse=lse, entropy=entropy, set_mass=set_mass,
                     received=received, n_visible=n_visible, set_names=inp.set_names)


def pair_weights(record: LayerRecord, lse: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Exact attention weights `[B, H, P]` of P (query, key) position pairs, from the row log-sum-exp.

    Args:
        record: the layer's q `[B, H, Q, D]` and k `[B, G, S, D]`.
        lse: `[B, H, Q]` from HeadStats (unused for a linear layer: its weights are read off the implicit
            pattern, built for the spanned query rows a block at a time).
        q_pos: `[P]` query positions.
        k_pos: `[P]` key positions; pairs the query may not see get 0.

    Returns:
        float32 `[B, H, P]`: softmax weights exp(q·k · scale - lse) (signed implicit weights for a linear layer).
    """
    if record.linear:
        return _implicit_pair_weights(record, q_pos, k_pos)
    n_heads, n_groups = record.q.shape[1], record.k.shape[1]
    q = record.q[:, :, q_pos].float()  # [B, H, P, D]
    k = record.k[:, :, k_pos].float().repeat_interleave(heads_per_group(n_heads, n_groups), dim=1)  # [B, H, P, D]
    logits = (q * k).sum(-1) * record.scale - lse[:, :, q_pos]
    weights = logits.exp()
    ok = record.visible_pairs(q_pos, k_pos)  # [B|1, P]
    return torch.where(ok[:, None, :], weights, torch.zeros_like(weights)).nan_to_num(0.0)


def _implicit_pair_weights(record: LayerRecord, q_pos: torch.Tensor, k_pos: torch.Tensor,
                           block_q: int = 128) -> torch.Tensor:
    B, H = record.mixer.fq.shape[:2]
    out = torch.zeros(B, H, len(q_pos), dtype=torch.float32, device=q_pos.device)
    if len(q_pos) == 0:
        return out
    lo, hi = int(q_pos.min()), int(q_pos.max()) + 1
    for i0 in range(lo, hi, block_q):
        i1 = min(hi, i0 + block_q)
        sel = ((q_pos >= i0) & (q_pos < i1)).nonzero()[:, 0]
        if len(sel) == 0:
            continue
        p = record.pattern(rows=slice(i0, i1)).float()  # [B, H, n, S]
        out[:, :, sel] = p[:, :, q_pos[sel] - i0, k_pos[sel]]
    ok = k_pos <= q_pos + (record.k.shape[2] - record.q.shape[2])
    return out * ok[None, None]
