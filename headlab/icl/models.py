"""One-layer attention models for in-context regression, each exposing every head's KQ and OV.

Shapes: B batch, N prompt length, d covariate dim, D = d + 1 token width, H heads.
Common convention for the head read-outs (what `kq()` and `ov()` return):
    ŷ = Σ_h OV_h · Σ_j a_hj z_j,   a_hj = attention over s_hj = z_jᵀ KQ_h z_q (· scale),
with KQ_h `[D, D]` and OV_h `[D]` (the row of the output that lands on ŷ).

- `LSA`: Zhang–Frei–Bartlett linear self-attention f(E) = E + W^PV E (Eᵀ W^KQ E)/N, prediction
  the bottom-right entry. E has N + 1 columns (the query's, with label 0, included), so KQ = W^KQ,
  OV = the last row of W^PV, a_j = s_j / N over j = 1 .. N + 1. Init W^PV = σ[[0,0],[0,1]],
  W^KQ = σ[[ΘΘᵀ,0],[0,0]] with ‖ΘΘᵀ‖_F = 1.
- `HeadAttention`: He et al.'s one layer of H heads with per-head Q_h, K_h, V_h `[D, D]` and
  O_h `[1, D]`, no positional encoding, the query attending to the N context tokens only:
  a_h = softmax(Zᵀ K_hᵀ Q_h z_q / √D). KQ_h = K_hᵀ Q_h, OV_h = O_h V_h. Init as their code's
  `nn.Linear` default, U(±1/√fan_in). `attention="linear"` drops the softmax (a_hj = s_hj/√D,
  "linear heads"); `"linear_mean"` also divides by N (the 1/N of ZFB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from headlab.icl.tasks import TaskParams

Kind = Literal["lsa", "softmax", "linear", "linear_mean"]


@dataclass(frozen=True, kw_only=True)
class ModelParams:
    """Which model, how many heads, and its initialisation.

    Attributes:
        kind: "lsa" (ZFB), "softmax" (He et al.), "linear" (their heads without softmax or 1/N),
            "linear_mean" (without softmax, divided by N).
        heads: H, the number of heads (LSA has one).
        sigma: the LSA init scale σ (ZFB need σ²‖Γ‖_op√d < 2).
        seed: seed of the initial weights.
    """

    kind: Kind = "softmax"
    heads: int = 2
    sigma: float = 0.5
    seed: int = 0

    @property
    def name(self) -> str:
        """A short label: "lsa", or "<kind>-<heads>h"."""
        return "lsa" if self.kind == "lsa" else f"{self.kind}-{self.heads}h"


class LSA(nn.Module):
    """ZFB linear self-attention on E = [Z, z_q] `[B, N+1, D]`; ŷ is f(E)'s bottom-right entry.

    Attributes:
        w_kq: W^KQ `[D, D]`.
        w_pv: W^PV `[D, D]`.

    Args:
        d: the covariate dimension (D = d + 1).
        sigma: the init scale σ: W^PV = σ[[0,0],[0,1]], W^KQ = σ[[ΘΘᵀ,0],[0,0]] with ‖ΘΘᵀ‖_F = 1.
        generator: the generator of Θ.
    """

    def __init__(self, d: int, *, sigma: float = 0.5, generator: torch.Generator | None = None):
        super().__init__()
        dim = d + 1
        theta = torch.randn(d, d, generator=generator)
        tt = theta @ theta.T
        kq = torch.zeros(dim, dim)
        kq[:d, :d] = sigma * tt / tt.norm()
        pv = torch.zeros(dim, dim)
        pv[d, d] = sigma
        self.w_kq = nn.Parameter(kq)  # W^KQ [D, D]
        self.w_pv = nn.Parameter(pv)  # W^PV [D, D]
        self.d = d

    n_heads = 1

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """ŷ `[B]` from context tokens `[B, N, D]` and query tokens `[B, D]`.

        Args:
            z: context tokens `[B, N, D]` (D = d + 1: covariates and label).
            zq: query tokens `[B, D]` (label 0).

        Returns:
            ŷ `[B]`.
        """
        n = z.shape[1]
        e = torch.cat([z, zq[:, None]], dim=1)  # [B, N+1, D]
        s = e @ (self.w_kq @ zq[..., None])  # [B, N+1, 1]: e_jᵀ W^KQ e_q
        mixed = (s * e).sum(1) / n  # [B, D]
        return mixed @ self.w_pv[-1]

    def kq(self) -> torch.Tensor:
        """Returns KQ `[1, D, D]`: a detached copy of W^KQ (one head)."""
        return self.w_kq.detach()[None].clone()

    def ov(self) -> torch.Tensor:
        """Returns OV `[1, D]`: the last row of W^PV (a detached copy)."""
        return self.w_pv.detach()[-1][None].clone()

    def product(self) -> torch.Tensor:
        """Returns W^PV_22 · W^KQ_11 `[d, d]`, the matrix Theorem 4.1 sends to Γ⁻¹ (a detached copy)."""
        return (self.w_pv[-1, -1] * self.w_kq[: self.d, : self.d]).detach().clone()


class HeadAttention(nn.Module):
    """He et al.'s one-layer H-head attention read out at the query (softmax or linear heads).

    Attributes:
        w_q: Q_h `[H, D, D]` (out × in).
        w_k: K_h `[H, D, D]`.
        w_v: V_h `[H, D, D]`.
        w_o: O_h `[H, D]`.

    Args:
        d: the covariate dimension (D = d + 1).
        heads: H.
        attention: "softmax", "linear" (no softmax) or "linear_mean" (no softmax, divided by N).
        generator: the generator of the U(±1/√fan_in) init.

    Raises:
        ValueError: another attention.
    """

    def __init__(self, d: int, heads: int, *, attention: Kind = "softmax", generator: torch.Generator | None = None):
        super().__init__()
        if attention not in ("softmax", "linear", "linear_mean"):
            raise ValueError(f"attention must be softmax, linear or linear_mean, not {attention!r}")
        dim = d + 1

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        self.w_q = uniform(heads, dim, dim, fan_in=dim)  # Q_h [H, D, D] (out × in)
        self.w_k = uniform(heads, dim, dim, fan_in=dim)  # K_h [H, D, D]
        self.w_v = uniform(heads, dim, dim, fan_in=dim)  # V_h [H, D, D]
        self.w_o = uniform(heads, dim, fan_in=heads * dim)  # O_h [H, D]
        self.attention = attention
        self.d = d
        self.n_heads = heads

    def scores(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """The scores s_hj = z_jᵀ K_hᵀ Q_h z_q / √D.

        Args:
            z: context tokens `[B, N, D]` (D = d + 1: covariates and label).
            zq: query tokens `[B, D]` (label 0).

        Returns:
            `[B, H, N]`.
        """
        # K_hᵀ Q_h z_q first: O(B·N·H·D) instead of projecting every key, O(B·N·H·D²)
        kq_zq = torch.einsum("hij,hik,bk->bhj", self.w_k, self.w_q, zq)  # [B, H, D]
        return torch.einsum("bnj,bhj->bhn", z, kq_zq) / math.sqrt(self.d + 1)

    def weights(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """The query's attention weights a_hj (softmax of the scores, or the scores for linear heads).

        Args:
            z: context tokens `[B, N, D]` (D = d + 1: covariates and label).
            zq: query tokens `[B, D]` (label 0).

        Returns:
            `[B, H, N]`.
        """
        s = self.scores(z, zq)
        if self.attention == "softmax":
            return s.softmax(-1)
        return s / z.shape[1] if self.attention == "linear_mean" else s

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """ŷ `[B]` from context tokens `[B, N, D]` and query tokens `[B, D]`.

        Args:
            z: context tokens `[B, N, D]` (D = d + 1: covariates and label).
            zq: query tokens `[B, D]` (label 0).

        Returns:
            ŷ = Σ_h Σ_j a_hj OV_h z_j, `[B]`.
        """
        a = self.weights(z, zq)  # [B, H, N]
        values = torch.einsum("bnj,hj->bhn", z, self.ov_param())  # OV_h z_j [B, H, N]
        return (a * values).sum((1, 2))

    def ov_param(self) -> torch.Tensor:
        """Returns OV_h = O_h V_h `[H, D]`, differentiable."""
        return torch.einsum("hi,hij->hj", self.w_o, self.w_v)

    def kq(self) -> torch.Tensor:
        """Returns KQ_h = K_hᵀ Q_h `[H, D, D]` (s_j = z_jᵀ KQ_h z_q / √D), detached."""
        return torch.einsum("hij,hik->hjk", self.w_k, self.w_q).detach()

    def ov(self) -> torch.Tensor:
        """Returns OV_h `[H, D]`, detached."""
        return self.ov_param().detach()


def build(model: ModelParams, task: TaskParams) -> nn.Module:
    """A freshly initialised model for prompts of `task`, seeded by `model.seed`.

    Args:
        model: which model (kind, heads, σ, seed).
        task: the task (its d).

    Returns:
        An LSA or a HeadAttention.
    """
    generator = torch.Generator().manual_seed(model.seed)
    if model.kind == "lsa":
        return LSA(task.d, sigma=model.sigma, generator=generator)
    return HeadAttention(task.d, model.heads, attention=model.kind, generator=generator)


@torch.no_grad()
def predict(model: nn.Module, prompts, *, chunk: int = 8192) -> torch.Tensor:
    """ŷ `[B]` on a batch of `Prompts`, in chunks (no grad).

    Args:
        model: an LSA or HeadAttention.
        prompts: the Prompts.
        chunk: prompts per forward.

    Returns:
        ŷ `[B]`.
    """
    out = []
    for start in range(0, len(prompts), chunk):
        z, zq = prompts[start:start + chunk].tokens()
        out.append(model(z, zq))
    return torch.cat(out)
