"""Error across prompt lengths and under shifts, for trained models against the baselines.

Every error is the mean squared error against the clean target ⟨w, x_q⟩ (the irreducible σ²
left out), on fresh prompts drawn with a fixed seed per setting so that every model and baseline
sees the same prompts.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

import headlab.icl.baselines as baselines
from headlab.icl.models import predict
from headlab.icl.tasks import Shift, TaskParams, sample


def _mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred.double() - target.double()) ** 2).mean())


def _slope(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The regression slope of ŷ on the clean target (1 for an unbiased predictor)."""
    p, t = pred.double() - pred.double().mean(), target.double() - target.double().mean()
    return float((p * t).sum() / (t * t).sum())


def errors_vs_n(models: dict[str, nn.Module], task: TaskParams, ns: Iterable[int], *, batch: int = 4096,
                seed: int = 0, shift: Shift | None = None, with_baselines: bool = True) -> dict[str, list[float]]:
    """MSE of each model and baseline at each prompt length N.

    Args:
        models: {name: a trained LSA or HeadAttention}.
        task: the task the prompts are drawn from.
        ns: the prompt lengths N.
        batch: prompts per length.
        seed: the draw's seed (each N its own stream).
        shift: a test-time shift of the prompts, or None.
        with_baselines: also the baselines' errors.

    Returns:
        {"n": [...], name: [mse per N], ...} with the baselines under "ols", "ridge", "gd",
        "debiased_gd" (their penalty and step set for the task at each N; the debiased-GD step
        fitted on the same prompts, an oracle).
    """
    ns = list(ns)
    table: dict[str, list[float]] = {"n": ns}
    for n in ns:
        prompts = sample(task, batch, n=n, shift=shift, seed=seed * 100_003 + n)
        rows = {name: predict(m, prompts) for name, m in models.items()}
        if with_baselines:
            rows |= baselines.predictions(prompts, task)
        for name, pred in rows.items():
            table.setdefault(name, []).append(_mse(pred, prompts.clean))
    return table


def covariate_shift(models: dict[str, nn.Module], task: TaskParams, scales: Iterable[float], *, batch: int = 4096,
                    seed: int = 0) -> dict[str, dict[str, list[float]] | list[float]]:
    """MSE and slope of ŷ on ⟨w, x_q⟩ when every covariate is scaled by c (Λ → c²Λ) at test time.

    ZFB: the trained LSA's prediction grows like c²·⟨w, x_q⟩ (slope ∝ c²), where least squares
    and ridge stay unbiased.

    Args:
        models: {name: a trained model}.
        task: the task the prompts are drawn from.
        scales: the covariate scales c.
        batch: prompts per scale.
        seed: the draw's seed.

    Returns:
        {"scale": [...], name: {"mse": [...], "slope": [...]}, ...} for the models, "ols" and "ridge".
    """
    scales = list(scales)
    table: dict = {"scale": scales}
    for i, c in enumerate(scales):
        prompts = sample(task, batch, shift=Shift(x_scale=c), seed=seed * 100_003 + 7919 * i)
        rows = {name: predict(m, prompts) for name, m in models.items()}
        rows["ols"] = baselines.ols(prompts)
        rows["ridge"] = baselines.ridge(prompts, task.ridge_penalty())
        for name, pred in rows.items():
            entry = table.setdefault(name, {"mse": [], "slope": []})
            entry["mse"].append(_mse(pred, prompts.clean))
            entry["slope"].append(_slope(pred, prompts.clean))
    return table


def dgd_agreement(model: nn.Module, task: TaskParams, step: float, bias: float, *, batch: int = 4096,
                  seed: int = 0) -> dict[str, float]:
    """How closely a softmax model follows the debiased-GD predictor its heads imply.

    The first-order expansion of Σ_h μ_h Σ_j y_j softmax_j(ω_h ⟨x_j, x_q⟩) is
    bias·ȳ + step·(1/N) Σ_j y_j (x_j − x̄)ᵀ x_q (bias = Σμ_h, step = Σ ω_h μ_h).

    Args:
        model: a trained softmax HeadAttention.
        task: the task the prompts are drawn from.
        step: Σ ω_h μ_h, the implied debiased-GD step.
        bias: Σ μ_h, the weight of ȳ.
        batch: prompts.
        seed: the draw's seed.

    Returns:
        rel_gap: ‖ŷ_model − ŷ_dgd‖/‖ŷ_dgd‖; model_mse and dgd_mse: their errors.
    """
    prompts = sample(task, batch, seed=seed * 100_003 + 31)
    pred = predict(model, prompts).double()
    dgd = baselines.debiased_gd(prompts, step).double() + bias * prompts.y.double().mean(1)
    return {"rel_gap": float((pred - dgd).norm() / dgd.norm()), "model_mse": _mse(pred, prompts.clean),
            "dgd_mse": _mse(dgd, prompts.clean)}
