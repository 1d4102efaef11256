"""Generation-time head edits: RazorAttention's per-head KV-cache policy (`RazorKV`) and `DecodeOnly`.

Retrieval KV heads keep every key. Every other KV head keeps `sinks` first tokens, a recent window
of `L = max(window, ceil(window_frac * N))` tokens (the paper's `max(S0, N/C)`; `window_frac=0` is
the fixed window of the authors' deployment code) and one compensation token standing for the
dropped set D: k̂ = mean k over D, v̂ = mean v over D, whose logit gets + log|D|.

When the cache is compressed:
- `compress_at=P` (the paper's choice, and what the needle harness uses with P = the prefill
  length): the cache is compressed once, when it holds P tokens. Every later query sees sinks,
  the last L prefill tokens, the compensation token of D = [sinks, P - L), and every token appended
  by decoding. Query rows before P (a prefill run inside the edit) see the full context.
- `compress_at=None`: a sliding policy; every query row, prefill rows included, sees sinks, its own
  recent window and the compensation token of what falls between them.

The edit computes each restricted head's attention over exactly that key set (keys outside it get
no weight), i.e. the outputs of the compressed cache; the full cache stays in memory for the other
heads, so `cache_fraction` reports the KV entries (and bytes) a compressed cache would hold. `RazorKV.cache(model)`
is that compressed cache for real (`razor_cache.RazorCache`): the same outputs, only the kept entries in memory.
Batches must not be left-padded (query row i of Q sits at absolute position S - Q + i).

`DecodeOnly(edits)` applies head edits to one-query forwards (decode steps with a KV cache) only, for
a single `generate()` call; the needle harness gets the same by entering the edit after prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from headlab.capture import HeadOverride, LayerOps, LayerRecord, attend
from headlab.errors import EditError
from headlab.heads import heads_per_group


@dataclass(frozen=True, kw_only=True)
class RazorKV:
    """RazorAttention's KV policy: full cache for retrieval KV heads, sinks + window + compensation elsewhere.

    Attributes:
        full: (layer, kv_group) pairs that keep the full cache (the retrieval heads, per KV head).
        sinks: N0, the first tokens every head keeps (4 in the paper).
        window: S0, the least recent-window length in tokens.
        window_frac: 1/C; the window is max(window, ceil(window_frac * N)) for a context of N tokens.
        compensation: add the compensation token (False: plain sinks + window, StreamingLLM-like).
        compress_at: cache length at which the cache is compressed once (None: sliding, per query row).
        block: query rows per chunk when many rows are recomputed at once (bounds memory at prefill).

    Raises:
        EditError: sinks < 0, window < 1, window_frac outside [0, 1], block < 1, or compress_at < 1.
    """

    full: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    sinks: int = 4
    window: int = 256
    window_frac: float = 0.0
    compensation: bool = True
    compress_at: int | None = None
    block: int = 256

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.window < 1 or not 0.0 <= self.window_frac <= 1.0 or self.block < 1:
            raise EditError(f"RazorKV needs sinks >= 0, window >= 1, 0 <= window_frac <= 1 and block >= 1; got "
                            f"sinks={self.sinks}, window={self.window}, window_frac={self.window_frac}, "
                            f"block={self.block}")
        if self.compress_at is not None and self.compress_at < 1:
            raise EditError(f"RazorKV.compress_at must be a cache length >= 1 or None, got {self.compress_at}")
        object.__setattr__(self, "full", frozenset((int(l), int(g)) for l, g in self.full))

    def cache(self, model) -> "RazorCache":
        """A real compressed cache with this policy (`headlab.edits.razor_cache.RazorCache`).

        Decode with it instead of the edit to hold only the kept entries in memory (same outputs as the edit with
        `compress_at` = the prompt's length).

        Args:
            model: the HeadModel that will decode with it.

        Returns:
            An empty RazorCache.
        """
        from headlab.edits.razor_cache import RazorCache

        return RazorCache(model, self)

    def window_for(self, n_tokens: int) -> int:
        """The recent-window length L for a context of n tokens.

        Args:
            n_tokens: the context length N.

        Returns:
            max(window, ceil(window_frac · N)).
        """
        return max(self.window, math.ceil(self.window_frac * n_tokens))

    def layer_ops(self, model) -> dict[int, LayerOps]:
        """One override per layer over the query heads whose KV group is compressed (what `hl.edit` calls).

        Args:
            model: the HeadModel being edited.

        Returns:
            {layer: LayerOps with one `attend` override}, for layers with a compressed KV group.

        Raises:
            EditError: `full` names a KV head outside the model.
        """
        per_group = heads_per_group(model.n_heads, model.n_kv_heads)
        for layer, group in self.full:
            if not (0 <= layer < model.n_layers and 0 <= group < model.n_kv_heads):
                raise EditError(f"RazorKV.full names KV head ({layer}, {group}) outside {model.name}'s "
                                f"{model.n_layers} layers × {model.n_kv_heads} KV heads")
        ops = {}
        for layer in range(model.n_layers):
            heads = tuple(h for h in range(model.n_heads) if (layer, h // per_group) not in self.full)
            if heads:
                ops[layer] = LayerOps(overrides=(HeadOverride(heads, self.attend, name="razor"),))
        return ops

    def dropped(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dropped key range [lo, hi) of each query row at absolute `positions` `[Q]` (hi <= lo: none).

        Args:
            positions: absolute query positions `[Q]`.

        Returns:
            (lo `[Q]`, hi `[Q]`): keys lo .. hi-1 are dropped (lo = sinks; hi <= lo before compression).
        """
        lo = torch.full_like(positions, self.sinks)
        if self.compress_at is not None:
            hi = torch.full_like(positions, self.compress_at - self.window_for(self.compress_at))
            hi = torch.where(positions >= self.compress_at, hi, lo)  # not yet compressed
        else:
            n = positions + 1
            length = torch.clamp(torch.ceil(self.window_frac * n.double()).long(), min=self.window)
            hi = n - length
        return lo, torch.maximum(hi, lo)

    def attend(self, record: LayerRecord, heads: tuple[int, ...]) -> tuple[torch.Tensor, None]:
        """Override: outputs `[B, Q, h, D]` of the heads, attending over their kept keys + compensation.

        Computed per KV group (all query heads of the groups involved, then the asked ones are picked),
        so keys and values are never expanded to query heads.

        Args:
            record: the layer's LayerRecord (q, k, v, visibility, scale).
            heads: the query heads to compute.

        Returns:
            (outputs `[B, Q, h, D]` in v's dtype, None: no pattern).
        """
        n_heads, n_groups = record.q.shape[1], record.k.shape[1]
        per = heads_per_group(n_heads, n_groups)
        dev = record.q.device
        gsel = torch.unique(torch.as_tensor(heads, device=dev) // per)  # [g]
        every = gsel.numel() == n_groups
        k = (record.k if every else record.k.index_select(1, gsel)).float()  # [B, g, S, D]
        v = (record.v if every else record.v.index_select(1, gsel)).float()
        (B, g, n_k, D), n_q = k.shape, record.q.shape[2]
        q = record.q.reshape(B, n_groups, per, n_q, D)[:, gsel].float()  # [B, g, per, Q, D]
        lo, hi = self.dropped(torch.arange(n_k - n_q, n_k, device=dev))  # [Q] each
        keys = torch.arange(n_k, device=dev)
        kept = record.visible()[:, 0] & ~((keys >= lo[:, None]) & (keys < hi[:, None]))  # [B|1, Q, S]
        count = (hi - lo).float()  # [Q]
        means = _dropped_means(k, v, lo, hi) if self.compensation else None  # 2 × [B, g, 1|Q, D]
        out = torch.empty_like(q)
        for start in range(0, n_q, self.block):
            rows = slice(start, start + self.block)
            qr = q[:, :, :, rows]  # [B, g, per, q, D]
            logits = torch.matmul(qr.reshape(B, g, -1, D), k.transpose(-1, -2)).view(*qr.shape[:-1], n_k)
            logits = (logits * record.scale).masked_fill(~kept[:, None, None, rows], float("-inf"))  # [B, g, per, q, S]
            if means is None:
                weights = torch.softmax(logits, -1).nan_to_num(0.0)
                out[:, :, :, rows] = torch.matmul(weights.view(B, g, -1, n_k), v).view(qr.shape)
                continue
            kh, vh = (m if m.shape[2] == 1 else m[:, :, rows] for m in means)  # [B, g, 1|q, D]
            comp = (qr * kh[:, :, None]).sum(-1) * record.scale + count[rows].log()  # [B, g, per, q]; -inf: D empty
            weights = torch.softmax(torch.cat([logits, comp[..., None]], -1), -1).nan_to_num(0.0)
            mixed = torch.matmul(weights[..., :n_k].reshape(B, g, -1, n_k), v).view(qr.shape)
            out[:, :, :, rows] = mixed + weights[..., n_k:] * vh[:, :, None]
        pick = [int((gsel == h // per).nonzero()) * per + h % per for h in heads]
        out = out.reshape(B, g * per, n_q, D)[:, pick]  # [B, h, Q, D]
        return out.transpose(1, 2).to(record.v.dtype), None

    def kept_tokens(self, n_tokens: int) -> int:
        """KV entries one compressed KV head holds when the cache has n tokens (compensation token included).

        Args:
            n_tokens: the cache length.

        Returns:
            The entry count.
        """
        if self.compress_at is None:
            return self.kept_tokens_at(n_tokens)
        if n_tokens < self.compress_at:  # not compressed yet
            return n_tokens
        return self.kept_tokens_at(self.compress_at) + (n_tokens - self.compress_at)

    def kept_tokens_at(self, n: int) -> int:
        """KV entries of a compressed head right after compressing a cache of n tokens.

        Args:
            n: the cache length at compression.

        Returns:
            min(n, sinks + window) plus the compensation token when something was dropped.
        """
        kept = min(n, self.sinks + self.window_for(n))
        return kept + int(self.compensation and n > kept)

    def cache_fraction(self, model, n_tokens: int) -> dict[str, float]:
        """KV entries and bytes kept against the full cache, when the cache holds n tokens.

        Args:
            model: the HeadModel (its geometry and dtype).
            n_tokens: the cache length.

        Returns:
            {"kept_entries", "full_entries" (one entry = one key and one value of one KV head at one position),
            "fraction" = kept / full, "kept_bytes", "full_bytes" (in the model's dtype)}.
        """
        n_full = len(self.full)
        total = model.n_layers * model.n_kv_heads
        kept = n_full * n_tokens + (total - n_full) * self.kept_tokens(n_tokens)
        per_entry = 2 * model.head_dim * torch.finfo(model.dtype).bits // 8
        return {"kept_entries": kept, "full_entries": total * n_tokens, "fraction": kept / (total * n_tokens),
                "kept_bytes": kept * per_entry, "full_bytes": total * n_tokens * per_entry}


def _dropped_means(k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key and value `[B, g, 1|Q, D]` over each row's dropped range [lo, hi) (zeros where empty).

    k, v: `[B, g, S, D]`; lo, hi: `[Q]`. One shared range (decode steps, a compressed cache) is a
    plain mean; per-row ranges (sliding prefill) use float64 prefix sums.
    """
    if bool((lo == lo[0]).all() and (hi == hi[0]).all()):
        a, b = int(lo[0]), int(hi[0])
        if b <= a:
            return k.new_zeros(*k.shape[:2], 1, k.shape[3]), v.new_zeros(*v.shape[:2], 1, v.shape[3])
        return k[:, :, a:b].mean(2, keepdim=True), v[:, :, a:b].mean(2, keepdim=True)
    n = (hi - lo).clamp_min(1)[:, None].double()  # [Q, 1]
    out = []
    for x in (k, v):
        sums = torch.cat([x.new_zeros(*x.shape[:2], 1, x.shape[3], dtype=torch.float64), x.double().cumsum(2)], 2)
        out.append(((sums[:, :, hi] - sums[:, :, lo]) / n).float())  # [B, g, Q, D]
    return out[0], out[1]


@dataclass(frozen=True)
class DecodeOnly:
    """Head edits that act on one-query forwards only (decode steps); longer forwards (prefill) are unedited.

    On prefill forwards every head the inner edits touch is recomputed explicitly (`capture.attend`: a
    `[B, h, Q, S]` pattern per head, equal to the backend to float noise). One edit per head: a head's
    ops become separate overrides, so stacking two edits on one head keeps only the last.

    Attributes:
        edits: the inner edits (Ablate, Scale, RazorKV, ...; not MoH, Add or positional Patch).
    """

    edits: tuple = ()

    def layer_ops(self, model) -> dict[int, LayerOps]:
        """The inner edits' ops, each turned into an override that leaves the heads unedited when Q > 1.

        Args:
            model: the HeadModel being edited.

        Returns:
            {layer: LayerOps of decode-only overrides}.

        Raises:
            EditError: a MoH, Add or Patch (with positions or per-position values) among the inner edits.
            HeadIndexError: a head out of range.
        """
        from headlab.edits.heads import compile_edits

        out = {}
        for layer, ops in compile_edits(model, list(self.edits)).items():
            new = [HeadOverride(o.heads, _when_decoding(o.fn), name=f"decode-only {o.name}") for o in ops.overrides]
            for head, factor in ops.scale:
                new.append(HeadOverride((head,), _when_decoding(_scaled(factor)), name="decode-only scale"))
            if ops.gates:
                raise EditError("DecodeOnly cannot hold a MoH edit: give MoH to hl.edit directly (it routes decode "
                                "steps token by token as it routes the prompt)")
            if ops.add:
                raise EditError("DecodeOnly cannot hold an Add: give the steering delta to the decode forwards directly")
            for head, vec, where in ops.replace:
                if where is not None or vec.dim() > 1:
                    raise EditError("DecodeOnly cannot hold a Patch: its values and positions belong to the prompt's "
                                    "own forward, not to decode steps")
                new.append(HeadOverride((head,), _when_decoding(_constant(vec)), name="decode-only replace"))
            out[layer] = LayerOps(overrides=tuple(new))
        return out


def _scaled(factor: float):
    """Override: the heads' own outputs times `factor`."""
    return lambda record, heads: (attend(record, heads)[0] * factor, None)


def _constant(vec: torch.Tensor):
    """Override: a fixed output vector `[D]` at every position (mean ablation)."""
    return lambda record, heads: (vec.to(record.v.dtype).expand(record.q.shape[0], record.q.shape[2], 1, -1), None)


def _when_decoding(fn):
    """An override that runs `fn` on one-query forwards and recomputes the heads unedited otherwise."""
    def override(record: LayerRecord, heads: tuple[int, ...]):
        return fn(record, heads) if record.q.shape[2] == 1 else (attend(record, heads)[0], None)
    return override
