"""Closed forms and pattern measures: ZFB's Theorem 4.1 for LSA, He et al.'s head patterns.

LSA (Zhang, Frei & Bartlett 2306.09927, Thm 4.1): with Γ = (1 + 1/N)Λ + tr(Λ)/N · I, gradient
flow from their init sends W^PV_22 · W^KQ_11 → Γ⁻¹ (factors tr(Γ⁻²)^(1/4) and
tr(Γ⁻²)^(−1/4) Γ⁻¹), so ŷ = x_qᵀ Γ⁻¹ (1/N) Σ y_i x_i.

Softmax heads (He et al., XintianPan/ICL_linear), per head h with KQ_h `[D, D]`, OV_h `[D]`:
- ω_h = mean of diag(KQ_h[:d, :d]) / √D, the head's inverse temperature on ⟨x_j, x_q⟩
  (their logger divides by √(d + 2) instead; √D is what the model's scale makes it);
- kq_identity = d·κ̄² / ‖KQ_h[:, :d]‖²_F with κ̄ the mean diagonal: 1 iff KQ_h acts on the query's
  x as κ̄·I and nothing else (the last column is left out: it multiplies the query's 0 label,
  gets no gradient and keeps its random init);
- ov_last = μ_h² / ‖OV_h‖² with μ_h = OV_h[-1]: 1 iff only the label is read out;
- zero_sum = |Σ_h μ_h| / Σ_h |μ_h|: 0 when the heads' μ cancel (± pairs).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from headlab.icl.tasks import TaskParams


def gamma(task: TaskParams, *, n: int | None = None,
          variant: Literal["paper", "no_1_over_n"] = "paper") -> torch.Tensor:
    """Γ `[d, d]` (float64) at prompt length n; "no_1_over_n" drops the (1 + 1/N) factor.

    Args:
        task: the task (its covariance Λ).
        n: the prompt length N (default: task.n).
        variant: "paper" (Γ = (1 + 1/N)Λ + tr(Λ)/N·I) or "no_1_over_n" (Λ + tr(Λ)/N·I).

    Returns:
        Γ, float64 `[d, d]`.
    """
    n = task.n if n is None else n
    lam = task.cov()
    factor = 1.0 + 1.0 / n if variant == "paper" else 1.0
    return factor * lam + torch.trace(lam) / n * torch.eye(task.d, dtype=lam.dtype)


def lsa_optimum(task: TaskParams, *, variant: Literal["paper", "no_1_over_n"] = "paper") -> torch.Tensor:
    """The product W^PV_22·W^KQ_11 that minimises the population loss `[d, d]`.

    Γ⁻¹ for ZFB's noiseless task; with noise (our derivation, not the theorem's)
    (Γ + σ²/(τ²N)·I)⁻¹.

    Args:
        task: the task.
        variant: Γ's variant (see `gamma`).

    Returns:
        float64 `[d, d]`.
    """
    g = gamma(task, variant=variant)
    g = g + task.noise_var / (task.task_var * task.n) * torch.eye(task.d, dtype=g.dtype)
    return torch.linalg.inv(g)


def lsa_population_loss(u: torch.Tensor, w: torch.Tensor, task: TaskParams) -> torch.Tensor:
    """The exact population loss ½E(ŷ − y_q)² of ŷ = u·hᵀ W x_q, h = (1/N) Σ y_i x_i.

    E[hhᵀ] = τ²ΛΓ + σ²Λ/N and E[hwᵀ] = τ²Λ (Gaussian fourth moments), so the loss is
    ½[u² tr(WΛWᵀ E[hhᵀ]) − 2u tr(ΛWᵀ E[hwᵀ]) + τ² tr Λ (+ σ² if the query is noisy)].

    Args:
        u: the scalar W^PV_22 (a 0-dim tensor).
        w: W^KQ_11 `[d, d]`.
        task: the task.

    Returns:
        The loss, a 0-dim tensor in w's dtype (differentiable in u and w).
    """
    lam, hh, hw = (m.to(w.dtype) for m in _population_moments(task))
    const = task.task_var * torch.trace(lam) + (task.noise_var if task.query_noise else 0.0)
    return 0.5 * (u ** 2 * torch.trace(w @ lam @ w.T @ hh) - 2 * u * torch.trace(lam @ w.T @ hw) + const)


def _population_moments(task: TaskParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Λ, E[hhᵀ] = τ²ΛΓ + σ²Λ/N and E[hwᵀ] = τ²Λ, float64 `[d, d]` each."""
    lam = task.cov()
    hh = task.task_var * lam @ gamma(task) + task.noise_var * lam / task.n
    return lam, hh, task.task_var * lam


def lsa_population_flow(task: TaskParams, u0: float, w0: torch.Tensor, *, dt: float | None = None,
                        max_time: float = 2000.0, tol: float = 1e-12) -> dict:
    """Integrate the gradient flow of `lsa_population_loss` over (u, W) with RK4 from (u0, W0).

    The gradient is analytic: ∂L/∂u = u tr(WΛWᵀA) − tr(ΛWᵀB), ∂L/∂W = u²AWΛ − uBΛ with
    A = E[hhᵀ], B = E[hwᵀ]. dt defaults to a stable step for the problem's stiffness; the flow
    stops when the gradient norm falls below `tol`.

    Args:
        task: the task.
        u0: the start of u.
        w0: the start of W `[d, d]`.
        dt: the RK4 step (default: stable for the problem's stiffness).
        max_time: the flow stops at this time at the latest.
        tol: the flow stops when the gradient norm falls below it.

    Returns:
        A dict with u, w (float64), the product u·W `[d, d]`, the time reached, the final gradient norm and the
        conserved u² − ‖W‖²_F at start and end (the flow keeps it fixed).
    """
    lam, a, b = _population_moments(task)
    if dt is None:
        op = lambda m: torch.linalg.matrix_norm(m, 2)  # noqa: E731
        curvature = torch.linalg.inv(gamma(task)).norm() * op(a) * op(lam)
        dt = float(0.25 / max(curvature, 1e-12))

    def grad(u: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gu = u * torch.trace(w @ lam @ w.T @ a) - torch.trace(lam @ w.T @ b)
        return gu, u ** 2 * a @ w @ lam - u * b @ lam

    u, w, t = torch.tensor(float(u0), dtype=torch.float64), w0.detach().double().clone(), 0.0
    start_balance = float(u ** 2 - (w ** 2).sum())
    while t < max_time:
        k1 = grad(u, w)
        if float(torch.sqrt(k1[0] ** 2 + (k1[1] ** 2).sum())) < tol:
            break
        k2 = grad(u - dt / 2 * k1[0], w - dt / 2 * k1[1])
        k3 = grad(u - dt / 2 * k2[0], w - dt / 2 * k2[1])
        k4 = grad(u - dt * k3[0], w - dt * k3[1])
        u = u - dt / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        w = w - dt / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        t += dt
    gu, gw = grad(u, w)
    return {"u": float(u), "w": w, "product": u * w, "time": t, "dt": dt,
            "grad_norm": float(torch.sqrt(gu ** 2 + (gw ** 2).sum())),
            "balance_start": start_balance, "balance_end": float(u ** 2 - (w ** 2).sum())}


def rel_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64.

    Args:
        a: a tensor.
        b: the reference, a's shape.

    Returns:
        The relative distance.
    """
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def lsa_theory_predict(prompts, task: TaskParams) -> torch.Tensor:
    """The theorem's predictor x_qᵀ Γ⁻¹ (1/N) Σ y_i x_i `[B]` (Γ at the training length)."""
    h = (prompts.y.double()[..., None] * prompts.x.double()).mean(1)
    return torch.einsum("bi,ij,bj->b", prompts.xq.double(), lsa_optimum(task), h).float()


def lsa_check(model, task: TaskParams, probes=None) -> dict[str, float]:
    """How far a trained `LSA` is from Theorem 4.1, and how far the (1+1/N)-less variant is.

    Args:
        model: a trained LSA.
        task: the task it was trained on.
        probes: Prompts on which to compare the predictions (None: no pred_dist).

    Returns:
        dist: ‖P − Γ⁻¹‖/‖Γ⁻¹‖ for P = W^PV_22·W^KQ_11.
        dist_variant: ‖P − Γ₀⁻¹‖/‖Γ₀⁻¹‖ with Γ₀ = Λ + tr(Λ)/N·I.
        gap: ‖Γ₀⁻¹ − Γ⁻¹‖/‖Γ⁻¹‖, what the check must resolve.
        scale: ⟨P, Γ⁻¹⟩/‖Γ⁻¹‖² − 1, P's error along Γ⁻¹ (entrywise noise averages out of it);
            scale_variant is the same number for Γ₀⁻¹ (where the variant would put it).
        pred_dist: relative RMS gap between the model's ŷ and the theorem's on `probes` (if given).
        off_block: the norm of the weights outside ZFB's invariant blocks, relative to the blocks'.
    """
    from headlab.icl.models import predict

    target, variant = lsa_optimum(task), lsa_optimum(task, variant="no_1_over_n")
    p = model.product().double()
    d = task.d
    kq, pv = model.w_kq.detach().double(), model.w_pv.detach().double()
    on = kq[:d, :d].norm() ** 2 + pv[d, d] ** 2
    off = kq[:d, d].norm() ** 2 + kq[d].norm() ** 2 + pv[:d].norm() ** 2 + pv[d, :d].norm() ** 2
    along = lambda m: float((m * target).sum() / (target * target).sum()) - 1  # noqa: E731
    out = {"dist": rel_dist(p, target), "dist_variant": rel_dist(p, variant), "gap": rel_dist(variant, target),
           "scale": along(p), "scale_variant": along(variant), "off_block": float((off / on).sqrt())}
    if probes is not None:
        theory = lsa_theory_predict(probes, task).double()
        out["pred_dist"] = float((predict(model, probes).double() - theory).norm() / theory.norm())
    return out


def head_measures(kq: torch.Tensor, ov: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head pattern measures from KQ `[..., H, D, D]` and OV `[..., H, D]`, each `[..., H]`.

    Args:
        kq: KQ_h `[..., H, D, D]` (e.g. stacked over checkpoints).
        ov: OV_h `[..., H, D]`.

    Returns:
        {"omega": mean diagonal of KQ's x block / √D, "mu": OV's last entry, "kq_identity": how close KQ's
        functional columns are to a multiple of the identity (1 = exactly), "kq_diag": their diagonal share,
        "ov_last": OV's last-entry share of its squared norm}, float32 `[..., H]` each.
    """
    dim = kq.shape[-1]
    d = dim - 1
    kq, ov = kq.double(), ov.double()
    diag = torch.diagonal(kq[..., :d, :d], dim1=-2, dim2=-1)  # [..., H, d]
    kappa = diag.mean(-1)
    functional = kq[..., :, :d]  # the columns that act on the query's x
    norm2 = (functional ** 2).sum((-2, -1)).clamp_min(1e-300)
    mu = ov[..., -1]
    return {
        "omega": (kappa / math.sqrt(dim)).float(),
        "mu": mu.float(),
        "kq_identity": (d * kappa ** 2 / norm2).float(),
        "kq_diag": ((diag ** 2).sum(-1) / norm2).float(),
        "ov_last": (mu ** 2 / (ov ** 2).sum(-1).clamp_min(1e-300)).float(),
    }


def pattern_summary(kq: torch.Tensor, ov: torch.Tensor, *, active_frac: float = 0.1) -> dict[str, float]:
    """One model's patterns from KQ `[H, D, D]` and OV `[H, D]` as numbers.

    A head is active when |ω_h μ_h| ≥ active_frac · max_h |ω_h μ_h| (the first-order weight of
    its debiased-GD term); the others are dummies. kq_identity and ov_last are averaged over heads
    weighted by |ω_h μ_h|; sign_agree is the share of active heads with sign ω = sign μ;
    dgd_step = Σ_h ω_h μ_h and bias = Σ_h μ_h are the first-order expansion's debiased-GD step
    and its leftover mean-label weight.

    Args:
        kq: KQ_h `[H, D, D]`.
        ov: OV_h `[H, D]`.
        active_frac: the activity threshold relative to the largest |ω_h μ_h|.

    Returns:
        {"heads", "active", "kq_identity", "ov_last", "zero_sum" (|Σμ| / Σ|μ|), "sign_agree", "dgd_step", "bias"}.
    """
    m = head_measures(kq, ov)
    omega, mu = m["omega"].double(), m["mu"].double()
    weight = (omega * mu).abs()
    active = weight >= active_frac * weight.max()
    share = weight / weight.sum().clamp_min(1e-300)
    return {
        "heads": int(omega.numel()),
        "active": int(active.sum()),
        "kq_identity": float((share * m["kq_identity"]).sum()),
        "ov_last": float((share * m["ov_last"]).sum()),
        "zero_sum": float(mu.sum().abs() / mu.abs().sum().clamp_min(1e-300)),
        "sign_agree": float(((omega.sign() == mu.sign()) & active).sum() / active.sum()),
        "dgd_step": float((omega * mu).sum()),
        "bias": float(mu.sum()),
    }
