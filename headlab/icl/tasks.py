"""In-context linear regression prompts: x ~ N(0, Λ), w ~ N(0, τ² I), y = ⟨w, x⟩ + ε, ε ~ N(0, σ²).

A prompt holds N context pairs (x_i, y_i) and a query x_q whose label the model predicts.
Tokens are z_i = [x_i; y_i] and z_q = [x_q; 0], D = d + 1 entries each. Two presets:
- `TaskParams.zfb()`: Zhang, Frei & Bartlett (2306.09927) — w ~ N(0, I), no noise.
- `TaskParams.he()`: He et al. (XintianPan/ICL_linear, `utils/data_utils.py`) — x ~ N(0, I),
  β ~ N(0, I/d), σ² = 0.1 on the context labels and on the query target.
Λ is diagonal: with an isotropic task prior every Λ is a rotation of its eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class TaskParams:
    """The prompt distribution.

    Attributes:
        d: covariate dimension.
        n: prompt length N (number of context pairs).
        noise_var: σ², the label-noise variance.
        task_var: τ², the variance of each entry of w.
        cov_diag: the eigenvalues of Λ (length d); None is the identity.
        query_noise: whether the query target carries noise too (He et al.'s code: yes).
    """

    d: int = 5
    n: int = 40
    noise_var: float = 0.0
    task_var: float = 1.0
    cov_diag: tuple[float, ...] | None = None
    query_noise: bool = False

    def __post_init__(self) -> None:
        if self.cov_diag is not None and len(self.cov_diag) != self.d:
            raise ValueError(f"cov_diag has {len(self.cov_diag)} entries, expected d = {self.d}")

    @classmethod
    def zfb(cls, *, d: int = 5, n: int = 40, cov_diag: tuple[float, ...] | None = None) -> "TaskParams":
        """Zhang–Frei–Bartlett: w ~ N(0, I), noiseless labels.

        Args:
            d: covariate dimension.
            n: prompt length.
            cov_diag: the eigenvalues of Λ (None: the identity).

        Returns:
            The TaskParams.
        """
        return cls(d=d, n=n, noise_var=0.0, task_var=1.0, cov_diag=cov_diag, query_noise=False)

    @classmethod
    def he(cls, *, d: int = 5, n: int = 40, noise_var: float = 0.1) -> "TaskParams":
        """He et al.: x ~ N(0, I), β ~ N(0, I/d), σ² = 0.1 on context and query labels.

        Args:
            d: covariate dimension.
            n: prompt length.
            noise_var: σ².

        Returns:
            The TaskParams.
        """
        return cls(d=d, n=n, noise_var=noise_var, task_var=1.0 / d, cov_diag=None, query_noise=True)

    @property
    def dim(self) -> int:
        """D = d + 1, the token width."""
        return self.d + 1

    def cov(self) -> torch.Tensor:
        """Returns Λ as a float64 `[d, d]` matrix."""
        diag = torch.ones(self.d) if self.cov_diag is None else torch.tensor(self.cov_diag)
        return torch.diag(diag.double())

    def ridge_penalty(self) -> float:
        """Returns σ²/τ², the penalty that makes ridge the Bayes posterior mean."""
        return self.noise_var / self.task_var


@dataclass(frozen=True, kw_only=True)
class Shift:
    """A test-time distribution shift (all 1/0 is no shift).

    Attributes:
        x_scale: c, scales every covariate (context and query): a covariate shift Λ → c²Λ.
        query_scale: scales the query covariate only.
        task_scale: scales the task vector's spread (τ → task_scale·τ).
        task_mean: added to every entry of w (a task shift away from the prior's mean).
    """

    x_scale: float = 1.0
    query_scale: float = 1.0
    task_scale: float = 1.0
    task_mean: float = 0.0


@dataclass
class Prompts:
    """A batch of prompts.

    Attributes:
        x: context covariates `[B, N, d]`.
        y: context labels `[B, N]`.
        xq: query covariates `[B, d]`.
        yq: query targets `[B]` (noisy when the task has `query_noise`).
        w: task vectors `[B, d]`.
    """

    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    w: torch.Tensor

    @property
    def clean(self) -> torch.Tensor:
        """The noiseless query target ⟨w, x_q⟩ `[B]`."""
        return (self.w * self.xq).sum(-1)

    @property
    def n(self) -> int:
        """N, the prompt length."""
        return self.x.shape[1]

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (Z `[B, N, D]` with z_i = [x_i; y_i], the query token z_q `[B, D]` = [x_q; 0])."""
        z = torch.cat([self.x, self.y[..., None]], dim=-1)
        zq = torch.cat([self.xq, torch.zeros_like(self.xq[:, :1])], dim=-1)
        return z, zq

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, idx) -> "Prompts":
        return Prompts(x=self.x[idx], y=self.y[idx], xq=self.xq[idx], yq=self.yq[idx], w=self.w[idx])


def sample(task: TaskParams, batch: int, *, n: int | None = None, shift: Shift | None = None,
           generator: torch.Generator | None = None, seed: int | None = None) -> Prompts:
    """Draw `batch` prompts of length `n` (default task.n), optionally shifted, in float32.

    Args:
        task: the prompt distribution.
        batch: how many prompts.
        n: the prompt length (default: task.n).
        shift: a test-time shift (None: none).
        generator: the random source; `seed` makes a fresh one instead.
        seed: seed of a fresh generator.

    Returns:
        Prompts: x `[B, N, d]`, y `[B, N]`, xq `[B, d]`, yq `[B]`, w `[B, d]`.
    """
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    shift = shift or Shift()
    n = task.n if n is None else n
    d = task.d
    std = torch.ones(d) if task.cov_diag is None else torch.tensor(task.cov_diag, dtype=torch.float32).sqrt()
    x = torch.randn(batch, n, d, generator=generator) * std * shift.x_scale
    xq = torch.randn(batch, d, generator=generator) * std * shift.x_scale * shift.query_scale
    w = torch.randn(batch, d, generator=generator) * (task.task_var ** 0.5) * shift.task_scale + shift.task_mean
    noise_std = task.noise_var ** 0.5
    y = torch.einsum("bnd,bd->bn", x, w) + noise_std * torch.randn(batch, n, generator=generator)
    eps_q = torch.randn(batch, generator=generator)
    yq = (w * xq).sum(-1) + (noise_std * eps_q if task.query_noise else 0.0)
    return Prompts(x=x, y=y, xq=xq, yq=yq, w=w)
