"""Mixture-of-Head routing of a pretrained model's heads, as a scoped head edit (MoH, Jin et al. 2024).

In each routed layer the first `shared` heads stay on for every token; the other ("routed") heads are scored per
token by a router and only the top-k of them keep their output (binary gates: a head's output is multiplied by 1 or
0). With every routed head active the edit is the identity, bit for bit.

Routers:
- `QueryNormRouter` (training-free, MoH's LLaMA3 conversion): a routed head's score is the ℓ2 norm of its query at
  that token, standardised over the layer's routed heads.
- `LearnedRouter`: that same score plus a learned linear function of the attention module's input (W x + b, zero at
  the start, so training starts from the training-free router); trained with only its own parameters
  (`headlab.moh.train_router`), through straight-through gates: hard top-k forward, the router's softmax backward.

GQA: a query head off for a token saves its rows of QKᵀ and AV; a KV group's cache read is saved only when every
query head of the group is off for the token (`headlab.moh.routing` reports both).

    with hl.edit(model, hl.MoH(active=0.6)):          # 3 of the 5 routed heads per token (smollm2: 9 heads, 4 shared)
        loss = model.loss(text)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from headlab.capture import Gate, LayerOps, LayerRecord
from headlab.errors import EditError
from headlab.models.head_model import HeadModel

#: called by a MoH edit with (layer, router scores `[B, Q, h_r]`, gates `[B, Q, H]`) as each layer routes
RouteHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class Router(Protocol):
    """Scores the routed heads of a layer per token (higher = more wanted)."""

    needs_input: bool

    def scores(self, record: LayerRecord, routed: list[int]) -> torch.Tensor:
        """Scores `[B, Q, h_r]` of the routed query heads `routed` at each token of the layer's record.

        Args:
            record: the layer's LayerRecord (post-RoPE q `[B, H, Q, D]`; x, the attention input, for routers with
                `needs_input`).
            routed: the routed query heads' indices.

        Returns:
            float `[B, Q, h_r]`, higher = more wanted.
        """


def query_norm_scores(q: torch.Tensor, routed: list[int]) -> torch.Tensor:
    """MoH's training-free router: ‖q_h‖₂ of each routed head at each token, standardised over the routed heads.

    Args:
        q: post-RoPE queries `[B, H, Q, D]` (RoPE keeps norms).
        routed: the routed heads' indices (h_r of them).

    Returns:
        float32 `[B, Q, h_r]` with zero mean and unit std per token (std 1 when one head is routed).
    """
    norms = q[:, routed].float().norm(dim=-1).transpose(1, 2)  # [B, Q, h_r]
    mean = norms.mean(-1, keepdim=True)
    std = norms.std(-1, keepdim=True, unbiased=False) if len(routed) > 1 else torch.ones_like(mean)
    return (norms - mean) / std.clamp_min(1e-6)


@dataclass(frozen=True)
class QueryNormRouter:
    """The training-free router: standardised query norms (see `query_norm_scores`).

    Attributes:
        needs_input: False: it reads only the queries.
    """

    needs_input: bool = field(default=False, init=False)

    def scores(self, record: LayerRecord, routed: list[int]) -> torch.Tensor:
        """`query_norm_scores(record.q, routed)`.

        Args:
            record: the layer's LayerRecord.
            routed: the routed heads' indices.

        Returns:
            float32 `[B, Q, h_r]`.
        """
        return query_norm_scores(record.q, routed)


@dataclass(frozen=True)
class RandomRouter:
    """A null router: independent uniform scores per (token, routed head), seeded by (seed, layer).

    The routing a router that knows nothing would give, to tell a router's choices from their number.

    Attributes:
        seed: the seed (with the layer index) of the scores.
        needs_input: False.
    """

    seed: int = 0
    needs_input: bool = field(default=False, init=False)

    def scores(self, record: LayerRecord, routed: list[int]) -> torch.Tensor:
        """Uniform random scores, the same for the same (seed, layer, shape).

        Args:
            record: the layer's LayerRecord (its q gives the shape and device).
            routed: the routed heads' indices.

        Returns:
            float32 `[B, Q, h_r]` in [0, 1).
        """
        B, _, Q, _ = record.q.shape
        gen = torch.Generator().manual_seed(self.seed * 100_003 + record.layer)
        return torch.rand(B, Q, len(routed), generator=gen).to(record.q.device)


class LearnedRouter(nn.Module):
    """Standardised query norms plus a learned linear score of the attention module's input, per routed layer.

    Attributes:
        weight: `[L, h_r, C]` (zero at the start).
        bias: `[L, h_r]` (zero at the start).
        layers: the model layers it routes (L of them, in weight order).
        n_routed: h_r, the routed heads per layer.
        hidden_size: C, the width of the attention module's input.
        needs_input: True: the edit hands it the attention input.

    Args:
        layers: the model layers to route.
        n_routed: routed heads per layer.
        hidden_size: the model's hidden size.
    """

    needs_input = True

    def __init__(self, layers: Iterable[int], n_routed: int, hidden_size: int) -> None:
        super().__init__()
        self.layers = tuple(int(layer) for layer in layers)
        self.n_routed = int(n_routed)
        self.hidden_size = int(hidden_size)
        self.weight = nn.Parameter(torch.zeros(len(self.layers), self.n_routed, self.hidden_size))
        self.bias = nn.Parameter(torch.zeros(len(self.layers), self.n_routed))
        self._index = {layer: i for i, layer in enumerate(self.layers)}

    def extra_repr(self) -> str:
        """Returns the module's repr details: layer count, routed heads and hidden size."""
        return f"layers={len(self.layers)}, n_routed={self.n_routed}, hidden_size={self.hidden_size}"

    def scores(self, record: LayerRecord, routed: list[int]) -> torch.Tensor:
        """Standardised query norms plus W x + b of the layer's attention input x.

        Args:
            record: the layer's LayerRecord, with its input `x` `[B, Q, C]`.
            routed: the routed heads' indices (n_routed of them).

        Returns:
            `[B, Q, h_r]` in the router's dtype (differentiable in weight and bias).

        Raises:
            EditError: a layer it does not route, another number of routed heads, or an input of another width.
        """
        i = self._index.get(record.layer)
        if i is None:
            raise EditError(f"this LearnedRouter routes layers {list(self.layers)}, not layer {record.layer}")
        if len(routed) != self.n_routed:
            raise EditError(f"this LearnedRouter scores {self.n_routed} routed heads, the edit routes {len(routed)}")
        x = record.x
        if x.shape[-1] != self.hidden_size:
            raise EditError(f"layer {record.layer}'s attention input has width {x.shape[-1]}, the router "
                            f"{self.hidden_size}: a router trained for another model")
        w, b = self.weight[i], self.bias[i]
        learned = torch.nn.functional.linear(x.to(w.dtype), w, b)  # [B, Q, h_r]
        return query_norm_scores(record.q, routed).to(learned.dtype) + learned


@dataclass(frozen=True, kw_only=True)
class MoH:
    """Mixture-of-Head routing as an edit: shared heads always on, the top-k routed heads per token on, the rest off.

    Attributes:
        active: routed heads kept per token: a fraction of the routed heads in (0, 1] (rounded to the nearest count,
            at least 1) or a count ≥ 1.
        shared: the first `shared` heads of each routed layer are always on (None: half the KV groups, rounded down,
            with all their query heads — half the heads for multi-head attention, as MoH's conversion of LLaMA3-8B
            shares 16 of 32; whole groups, so that routing can leave a group's cache unread).
        router: None (the training-free `QueryNormRouter`) or a `LearnedRouter`.
        layers: the layers to route (None: all).
        straight_through: gates carry the router's gradient (hard top-k forward, softmax backward) when grad is on;
            only for training a router (the forward values are the same binary gates).
        on_route: called per layer with (layer, scores, gates) — how `headlab.moh.routing` records the routing.
        compute: "dense" (the backend computes every head, then the gates zero those off: with every head on, the
            original model bit for bit) or "routed" (only the (token, head) rows that are on are computed, by
            `headlab_kernels.routed_attention`: Triton on CUDA, torch elsewhere; equal to dense to float tolerance,
            for causal prefills — other forwards fall back to dense).
        unit: "head" routes query heads one by one; "group" routes whole KV groups (a group's score: the mean of
            its heads' scores; k and the shared heads must then be whole groups), so every head that is off leaves
            its group's cache unread.

    Raises:
        EditError: an unknown unit or compute, an active count that is not a fraction in (0, 1] or a count ≥ 1, a
            negative shared count, or a router without a `scores` method.
    """

    active: float | int
    shared: int | None = None
    router: Any = None
    layers: tuple[int, ...] | None = None
    straight_through: bool = False
    on_route: RouteHook | None = field(default=None, compare=False)
    compute: str = "dense"
    unit: str = "head"

    def __post_init__(self) -> None:
        if self.unit not in ("head", "group"):
            raise EditError(f"MoH(unit={self.unit!r}): route single heads ('head') or whole KV groups ('group')")
        if self.compute not in ("dense", "routed"):
            raise EditError(f"MoH(compute={self.compute!r}): use 'dense' or 'routed'")
        a = self.active
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise EditError(f"MoH(active={a!r}): give a fraction of the routed heads in (0, 1] or a count >= 1")
        if isinstance(a, float) and not 0.0 < a <= 1.0:
            raise EditError(f"MoH(active={a}): a fraction of the routed heads must lie in (0, 1] (a count is an int)")
        if isinstance(a, int) and a < 1:
            raise EditError(f"MoH(active={a}): at least one routed head must stay on per token")
        if self.shared is not None and (isinstance(self.shared, bool) or not isinstance(self.shared, int)
                                        or self.shared < 0):
            raise EditError(f"MoH(shared={self.shared!r}) must be a count of heads >= 0")
        if self.router is not None and not callable(getattr(self.router, "scores", None)):
            raise EditError(f"MoH(router={self.router!r}) is not a router (it needs a scores(record, routed) method)")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))

    # -- geometry -------------------------------------------------------------------------------------------------

    def n_shared(self, model: HeadModel) -> int:
        """The number of shared (always-on) heads per routed layer of `model`.

        Args:
            model: the HeadModel.

        Returns:
            `shared`, or half the KV groups (rounded down) times the heads per group when `shared` is None.

        Raises:
            EditError: no routed head left.
        """
        per_group = model.n_heads // model.n_kv_heads
        shared = (model.n_kv_heads // 2) * per_group if self.shared is None else self.shared
        if shared >= model.n_heads:
            raise EditError(f"MoH(shared={shared}) leaves no routed head: {model.name} has {model.n_heads} heads per "
                            "layer")
        return shared

    def routed_heads(self, model: HeadModel) -> list[int]:
        """The routed heads' indices: n_shared .. n_heads - 1.

        Args:
            model: the HeadModel.

        Returns:
            The indices.

        Raises:
            EditError: no routed head left.
        """
        return list(range(self.n_shared(model), model.n_heads))

    def k(self, model: HeadModel) -> int:
        """Routed heads kept per token.

        Args:
            model: the HeadModel.

        Returns:
            k: a fraction of the routed heads rounded half up (at least 1), or the count given.

        Raises:
            EditError: a count larger than the number of routed heads.
        """
        n_routed = model.n_heads - self.n_shared(model)
        a = self.active
        if isinstance(a, float):  # a fraction, rounded half up
            return max(1, min(n_routed, math.floor(a * n_routed + 0.5)))
        if a > n_routed:
            raise EditError(f"MoH(active={a}) asks for more routed heads per token than the {n_routed} there are")
        return a

    def routed_layers(self, model: HeadModel) -> list[int]:
        """The layers this edit routes.

        Args:
            model: the HeadModel.

        Returns:
            `layers`, or every layer when None.

        Raises:
            HeadIndexError: a layer out of range.
        """
        layers = list(range(model.n_layers)) if self.layers is None else list(self.layers)
        model.check_layers(layers)
        return layers

    # -- the edit -------------------------------------------------------------------------------------------------

    def gates(self, scores: torch.Tensor, k: int, n_shared: int, per_group: int = 1) -> torch.Tensor:
        """Gates `[B, Q, H]` from routed scores `[B, Q, h_r]`: 1 for shared heads and the top-k routed ones.

        With `unit="group"`, the top k / per_group groups of `per_group` heads by their mean score are on.

        Args:
            scores: `[B, Q, h_r]` router scores.
            k: routed heads kept per token.
            n_shared: shared heads, placed first.
            per_group: query heads per KV group (for `unit="group"`).

        Returns:
            `[B, Q, n_shared + h_r]` binary gates (carrying the router's softmax gradient with `straight_through`).
        """
        n_routed = scores.shape[-1]
        if k >= n_routed:
            hard = torch.ones_like(scores)
        elif self.unit == "group":
            groups = scores.unflatten(-1, (n_routed // per_group, per_group)).mean(-1)
            top = torch.zeros_like(groups).scatter_(-1, groups.topk(k // per_group, dim=-1).indices, 1.0)
            hard = top.repeat_interleave(per_group, dim=-1)
        else:
            hard = torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
        routed = hard
        if self.straight_through and torch.is_grad_enabled() and scores.requires_grad:
            p = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
            routed = hard + p - p.detach()
        shared = torch.ones(*scores.shape[:-1], n_shared, dtype=routed.dtype, device=routed.device)
        return torch.cat([shared, routed], dim=-1)

    def layer_ops(self, model: HeadModel) -> dict[int, LayerOps]:
        """The seam ops of this edit on `model` (what `hl.edit` calls): one gate per routed layer.

        Args:
            model: the HeadModel being edited.

        Returns:
            {layer: LayerOps with a Gate computing the gates from the router's scores}.

        Raises:
            EditError: non-softmax layers, no routed head, too large a count, or (unit="group") shared heads or k
                that are not whole groups.
            HeadIndexError: a layer out of range.
        """
        if model.layer_kinds and any(kind != "softmax" for kind in model.layer_kinds):
            raise EditError(f"MoH routes softmax heads; {model.name} has {sorted(set(model.layer_kinds))} layers")
        router = self.router if self.router is not None else QueryNormRouter()
        n_shared, routed, k = self.n_shared(model), self.routed_heads(model), self.k(model)
        needs_input = bool(getattr(router, "needs_input", False))
        per_group = model.n_heads // model.n_kv_heads if self.unit == "group" else 1
        if per_group > 1 and (n_shared % per_group or k % per_group):
            raise EditError(f"MoH(unit='group') routes whole KV groups of {per_group} heads: shared ({n_shared}) and "
                            f"active ({k}) must be multiples of {per_group}")
        ops = {}
        for layer in self.routed_layers(model):
            def fn(record: LayerRecord, layer: int = layer) -> torch.Tensor:
                scores = router.scores(record, routed)
                gates = self.gates(scores, k, n_shared, per_group)
                if self.on_route is not None:  # not detached: a router's training reads its load balance from them
                    self.on_route(layer, scores, gates)
                return gates

            ops[layer] = LayerOps(gates=(Gate(fn, needs_input=needs_input, name="MoH",
                                              routed=self.compute == "routed"),))
        return ops
