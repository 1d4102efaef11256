"""Reference predictors for in-context regression: OLS, ridge (Bayes), one-step and debiased GD.

All take `Prompts` (x `[B, N, d]`, y `[B, N]`, xq `[B, d]`) and return ŷ `[B]` in float32,
computing in float64.
"""

from __future__ import annotations

import torch

from headlab.icl.tasks import Prompts, TaskParams
from headlab.icl.theory import gamma


def _f64(p: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return p.x.double(), p.y.double(), p.xq.double()


def ols(p: Prompts) -> torch.Tensor:
    """Least squares x_qᵀ X⁺ y (the minimum-norm solution when N < d).

    Args:
        p: prompts (x `[B, N, d]`, y `[B, N]`, xq `[B, d]`).

    Returns:
        ŷ `[B]` float32 (computed in float64).
    """
    x, y, xq = _f64(p)
    w = torch.linalg.pinv(x) @ y[..., None]  # [B, d, 1]
    return (xq[:, None] @ w).flatten().float()


def ridge(p: Prompts, penalty: float) -> torch.Tensor:
    """Ridge x_qᵀ (XᵀX + λI)⁻¹ Xᵀ y; with λ = σ²/τ² it is the Bayes posterior mean.

    Args:
        p: prompts (x `[B, N, d]`, y `[B, N]`, xq `[B, d]`).
        penalty: λ (0: `ols`).

    Returns:
        ŷ `[B]` float32 (computed in float64).
    """
    if penalty == 0:
        return ols(p)
    x, y, xq = _f64(p)
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    w = torch.linalg.solve(x.mT @ x + penalty * eye, x.mT @ y[..., None])
    return (xq[:, None] @ w).flatten().float()


def posterior_mean(p: Prompts, task: TaskParams) -> torch.Tensor:
    """E[⟨w, x_q⟩ | prompt] by Gaussian conditioning: x_qᵀ τ²Xᵀ(τ²XXᵀ + σ²I)⁻¹ y (the kernel form).

    Args:
        p: prompts (x `[B, N, d]`, y `[B, N]`, xq `[B, d]`).
        task: the task (its task variance τ² and noise variance σ²).

    Returns:
        ŷ `[B]` float32 (computed in float64).
    """
    x, y, xq = _f64(p)
    k = task.task_var * x @ x.mT + task.noise_var * torch.eye(x.shape[1], dtype=x.dtype)
    w = task.task_var * x.mT @ torch.linalg.solve(k, y[..., None])
    return (xq[:, None] @ w).flatten().float()


def gd_one_step(p: Prompts, step: float) -> torch.Tensor:
    """One GD step from w = 0 on ½·mean (y − ⟨w, x⟩)²: ŷ = η x_qᵀ (1/N) Σ y_i x_i.

    Args:
        p: prompts (x `[B, N, d]`, y `[B, N]`, xq `[B, d]`).
        step: η.

    Returns:
        ŷ `[B]` float32 (computed in float64).
    """
    x, y, xq = _f64(p)
    h = (y[..., None] * x).mean(1)
    return (step * (h * xq).sum(-1)).float()


def debiased_gd(p: Prompts, step: float) -> torch.Tensor:
    """He et al.'s debiased GD: ŷ = η (1/N) Σ y_i (x_i − x̄)ᵀ x_q.

    Args:
        p: prompts (x `[B, N, d]`, y `[B, N]`, xq `[B, d]`).
        step: η.

    Returns:
        ŷ `[B]` float32 (computed in float64).
    """
    x, y, xq = _f64(p)
    h = (y[..., None] * (x - x.mean(1, keepdim=True))).mean(1)
    return (step * (h * xq).sum(-1)).float()


def optimal_gd_step(task: TaskParams, n: int | None = None) -> float:
    """The step η minimising the population error of `gd_one_step` at length n (closed form).

    With h = (1/N) Σ y_i x_i: E[hhᵀ] = τ²ΛΓ + σ²Λ/N and E[hwᵀ] = τ²Λ, so
    η* = τ² tr(Λ²) / tr(τ²Λ²Γ + σ²Λ²/N).

    Args:
        task: the task (covariance Λ, variances τ², σ²).
        n: the prompt length N (default: `task.n`).

    Returns:
        η*.
    """
    n = task.n if n is None else n
    lam = task.cov()
    g = gamma(task, n=n)
    lam2 = lam @ lam
    num = task.task_var * torch.trace(lam2)
    den = torch.trace(task.task_var * lam2 @ g + task.noise_var * lam2 / n)
    return float(num / den)


def fit_step(features: torch.Tensor, target: torch.Tensor) -> float:
    """The least-squares scalar η for ŷ = η·features `[B]` against `target` `[B]`."""
    f, t = features.double(), target.double()
    return float((f * t).sum() / (f * f).sum())


def predictions(p: Prompts, task: TaskParams, *, dgd_step: float | None = None) -> dict[str, torch.Tensor]:
    """Every baseline's ŷ `[B]` on `p`, the steps set for the task at this prompt length.

    Args:
        dgd_step: the debiased-GD step; None fits it on these prompts' clean targets (an oracle
            step, so that the curve is debiased GD at its best).
    """
    n = p.n
    out = {
        "ols": ols(p),
        "ridge": ridge(p, task.ridge_penalty()),
        "gd": gd_one_step(p, optimal_gd_step(task, n)),
    }
    if dgd_step is None:
        dgd_step = fit_step(debiased_gd(p, 1.0), p.clean)
    out["debiased_gd"] = debiased_gd(p, dgd_step)
    return out
