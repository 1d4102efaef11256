"""Writes notebooks/icl_regression.ipynb (no outputs): `python notebooks/make_icl_regression.py`."""

from __future__ import annotations

from pathlib import Path

from nbwrite import write_notebook

NOTEBOOK = "icl_regression.ipynb"
ID_PREFIX = "icl"

CELLS = [
    ("md", """# In-context linear regression: one attention layer against theory

Two papers, one workbench. **Zhang, Frei & Bartlett** (ZFB, 2306.09927) train one linear self-attention
(LSA) layer on prompts `x ~ N(0, Λ)`, `y = ⟨w, x⟩` and prove (Theorem 4.1) that `W^PV_22 · W^KQ_11 → Γ⁻¹`
with `Γ = (1 + 1/N)Λ + tr(Λ)/N · I`. **He et al.** ("In-Context Linear Regression Demystified") train one
layer of H softmax heads and find per-head patterns: KQ ≈ ω_h·I, OV reading only the label (μ_h),
Σ_h μ_h ≈ 0. Here: small settings (d = 5, N = 40, a few thousand steps) so that the notebook runs in
about a minute; `python -m headlab.icl.report` runs every check at the papers' sizes."""),
    ("code", """import torch
from headlab import icl
from headlab.viz import icl as figures

torch.set_num_threads(1)  # these models are tiny: one thread is the fastest"""),
    ("md", """## 1. LSA: the trained product against Γ⁻¹

First the exact gradient flow of the population loss from ZFB's initialisation, then the real check:
the LSA module trained by SGD on sampled prompts. The check must resolve the `(1 + 1/N)` factor: for
Λ = I, Γ⁻¹ and the factor-less Γ₀⁻¹ are only 1/(N + d) = 2.2% apart."""),
    ("code", """zfb = icl.TaskParams.zfb()  # d = 5, N = 40, Λ = I, w ~ N(0, I), no noise
init = icl.build(icl.ModelParams(kind="lsa", sigma=0.5, seed=0), zfb)
flow = icl.lsa_population_flow(zfb, float(init.w_pv[-1, -1].detach()), init.w_kq.detach()[:5, :5])
print(f"flow: ‖uW − Γ⁻¹‖/‖Γ⁻¹‖ = {icl.rel_dist(flow['product'], icl.lsa_optimum(zfb)):.1e}")

lsa_run = icl.train(zfb, icl.ModelParams(kind="lsa", sigma=0.5, seed=0),
                    icl.TrainParams.for_kind("lsa", steps=1000, batch=1024), progress=False)
lsa = icl.lsa_check(lsa_run.model, zfb, lsa_run.probes)
print(f"SGD:  ‖P − Γ⁻¹‖/‖Γ⁻¹‖ = {lsa['dist']:.3%}, ‖P − Γ₀⁻¹‖/‖Γ₀⁻¹‖ = {lsa['dist_variant']:.3%} "
      f"(the two targets are {lsa['gap']:.3%} apart); along Γ⁻¹: {lsa['scale']:+.3%}")
figures.lsa_distance_curve(lsa_run)"""),
    ("md", """## 2. Two softmax heads: the emergent patterns

He et al.'s task (x ~ N(0, I), β ~ N(0, I/d), σ² = 0.1) and model (per-head Q, K, V, O; no positional
encoding; Adam 1e-3, batch 256). Two initial weights: seed 2 starts with the heads' μ of opposite signs,
seed 0 with the same sign."""),
    ("code", """he = icl.TaskParams.he()
runs = {seed: icl.train(he, icl.ModelParams(kind="softmax", heads=2, seed=seed),
                        icl.TrainParams.for_kind("softmax", steps=2000), progress=False) for seed in (2, 0)}
for seed, run in runs.items():
    s = icl.pattern_summary(run.history["kq"][-1], run.history["ov"][-1])
    m = icl.head_measures(run.history["kq"][-1], run.history["ov"][-1])
    print(f"seed {seed}: clean MSE {float(run.history['eval_clean_mse'][-1]):.3f}; "
          f"ω = {[round(v, 3) for v in m['omega'].tolist()]}, μ = {[round(v, 2) for v in m['mu'].tolist()]}; "
          f"KQ identity {s['kq_identity']:.3f}, OV last-entry {s['ov_last']:.3f}, zero-sum {s['zero_sum']:.3f}")
paired = runs[2]
figures.training_curves(paired)"""),
    ("code", """# drag the slider: KQ turns diagonal, OV keeps only its label entry
figures.weights_over_training(paired)"""),
    ("md", """## 3. Error against N, and length generalisation

Errors are against the clean target ⟨w, x_q⟩. Baselines: OLS, ridge with λ = σ²/τ² (the Bayes posterior
mean), one-step GD with its optimal step, debiased GD with a fitted step. Then linear heads (no softmax)
trained the same way, with and without the 1/N, tested on longer prompts."""),
    ("code", """table = icl.errors_vs_n({"softmax-2h": paired.model}, he, (10, 20, 40, 80), batch=2048)
for name, values in table.items():
    print(f"{name:<12}", "  ".join(f"{v:8.4g}" for v in values))
figures.error_curves(table, title="MSE against N (trained at N = 40)", train_n=40)"""),
    ("code", """linear = {f"{kind}-2h": icl.train(he, icl.ModelParams(kind=kind, heads=2, seed=2),
                                  icl.TrainParams.for_kind(kind, steps=1500), progress=False).model
          for kind in ("linear", "linear_mean")}
length = icl.errors_vs_n({"softmax-2h": paired.model, **linear}, he, (40, 160, 640), batch=1024)
for name in ("softmax-2h", "linear-2h", "linear_mean-2h", "ridge"):
    print(f"{name:<15}", "  ".join(f"{v:9.4g}" for v in length[name]))
figures.error_curves(length, title="Length generalisation (trained at N = 40)", train_n=40)"""),
    ("md", """## 4. Covariate shift

Scale every covariate by c at test time. ZFB: the LSA's prediction grows like c²·⟨w, x_q⟩ (it is not least
squares, which stays unbiased)."""),
    ("code", """shift = icl.covariate_shift({"lsa": lsa_run.model}, zfb, (0.5, 1.0, 2.0), batch=8192)
ratios = [s / shift["lsa"]["slope"][1] for s in shift["lsa"]["slope"]]
print("LSA slope ratio to c = 1:", [round(r, 3) for r in ratios], " c² =", [0.25, 1.0, 4.0])
print("OLS slope:", [round(s, 3) for s in shift["ols"]["slope"]])
figures.shift_slopes(shift, title="slope of ŷ on ⟨w, x_q⟩ under x → c·x")"""),
    ("code", """s2 = icl.pattern_summary(paired.history["kq"][-1], paired.history["ov"][-1])
findings = {
    "LSA product off Γ⁻¹": f"{lsa['dist']:.2%} (Γ₀⁻¹ is {lsa['gap']:.2%} away)",
    "2 heads, μ of opposite signs at init": f"zero-sum {s2['zero_sum']:.3f}, KQ identity {s2['kq_identity']:.3f}, "
                                            f"OV last-entry {s2['ov_last']:.3f}",
    "clean MSE at N = 40, paired vs same-sign init": f"{float(runs[2].history['eval_clean_mse'][-1]):.3f} vs "
                                                      f"{float(runs[0].history['eval_clean_mse'][-1]):.3f}",
    "MSE at N = 640, softmax / linear / linear with 1/N": " / ".join(f"{length[k][-1]:.3g}" for k in
                                                                  ("softmax-2h", "linear-2h", "linear_mean-2h")),
    "LSA slope ratio at c = 2": f"{ratios[-1]:.2f} (c² = 4)",
}
for k, v in findings.items():
    print(f"{k}: {v}")"""),
    ("md", """## Findings

- **Theorem 4.1 holds to the factor.** The exact population flow lands on Γ⁻¹ to ~1e-13, and the LSA module
  trained by SGD on sampled prompts lands within a few tenths of a percent of Γ⁻¹ while the factor-less
  Γ₀⁻¹ stays ≈ 2.2% away: the check resolves the (1 + 1/N) factor.
- **Two softmax heads learn He et al.'s patterns** when their initial μ have opposite signs: KQ becomes ω·I on
  the x block, OV keeps only the label entry, μ₁ ≈ −μ₂ with sign(ω) = sign(μ), and the error falls to about
  the debiased-GD level (≈ 0.15 against the one-head plateau ≈ 0.30). With μ of the same sign at init the
  two heads first act as one head and sit on that plateau (here still at 2000 steps); whether and when they
  split is seed-dependent (in the report, 1 of 2 such seeds has split by 6000 steps).
- **Still far from Bayes.** At N = 40 the trained heads and one-step/debiased GD sit near 0.14–0.15 while
  ridge (the Bayes posterior mean) reaches ≈ 0.015.
- **Length generalisation is about normalisation.** Softmax heads trained at N = 40 improve on longer
  prompts; linear heads without 1/N blow up (their scale is fixed to N = 40); linear heads with 1/N
  generalise as well as softmax.
- **Covariate shift:** the LSA's slope grows like c² (≈ 4× at c = 2) while OLS stays at 1."""),
]


def main() -> None:
    write_notebook(CELLS, Path(__file__).resolve().parent / NOTEBOOK, id_prefix=ID_PREFIX)


if __name__ == "__main__":
    main()
