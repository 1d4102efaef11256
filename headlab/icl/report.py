"""`python -m headlab.icl.report`: every in-context regression check at the papers' default sizes.

Prints each check's numbers with its run time, and writes report.json and the figures into
--out (default runs/icl-report). Trained runs are checkpointed under OUT/runs/, so a rerun
reuses (or resumes) them; delete that folder to retrain. d = 5, N = 40 throughout.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from headlab.viz import icl as figures
from headlab.icl.evals import covariate_shift, dgd_agreement, errors_vs_n
from headlab.icl.models import ModelParams, build, predict
from headlab.icl.tasks import TaskParams, sample
from headlab.icl.theory import (
    gamma,
    head_measures,
    lsa_check,
    lsa_optimum,
    lsa_population_flow,
    lsa_population_loss,
    lsa_theory_predict,
    pattern_summary,
    rel_dist,
)
from headlab.icl.training import TrainParams, train
from headlab.results import write_json


class Report:
    """Collects sections of numbers with timings; prints them as they come."""

    def __init__(self, out: Path):
        self.out, self.data, self.clock = out, {}, time.perf_counter()

    def section(self, name: str, seconds: float, numbers: dict, lines: list[str]) -> None:
        self.data[name] = {"seconds": round(seconds, 2), **numbers}
        print(f"\n== {name} ({seconds:.1f} s)")
        for line in lines:
            print("  " + line)

    def figure(self, fig, name: str) -> None:
        fig.write_html(self.out / f"{name}.html", include_plotlyjs="cdn")

    def save(self) -> None:
        self.data["total_seconds"] = round(time.perf_counter() - self.clock, 1)
        write_json(self.out / "report.json", self.data)


def _train(rep: Report, task, model, tp, name: str):
    start = time.perf_counter()
    run = train(task, model, tp, out=rep.out / "runs" / name, progress=False)
    return run, time.perf_counter() - start


def lsa_section(rep: Report, quick: bool) -> None:
    """Theorem 4.1: the population flow (exact) and an SGD-trained LSA (the real check)."""
    task = TaskParams.zfb()
    start = time.perf_counter()
    init = build(ModelParams(kind="lsa", sigma=0.5, seed=0), task)
    flow = lsa_population_flow(task, float(init.w_pv[-1, -1].detach()), init.w_kq.detach()[: task.d, : task.d])
    g_inv = torch.linalg.inv(gamma(task))
    u_star = float(torch.trace(g_inv @ g_inv) ** 0.25)
    numbers = {"flow_dist": rel_dist(flow["product"], lsa_optimum(task)),
               "flow_dist_variant": rel_dist(flow["product"], lsa_optimum(task, variant="no_1_over_n")),
               "flow_u": flow["u"], "theorem_u": u_star, "flow_time": flow["time"],
               "flow_w_dist": rel_dist(flow["w"], g_inv / u_star)}
    rep.section("LSA: gradient flow on the exact population loss", time.perf_counter() - start, numbers, [
        f"‖uW − Γ⁻¹‖/‖Γ⁻¹‖ = {numbers['flow_dist']:.2e}   "
        f"(to Γ₀⁻¹ without (1+1/N): {numbers['flow_dist_variant']:.4%})",
        f"u = {flow['u']:.6f} vs tr(Γ⁻²)^(1/4) = {u_star:.6f}; "
        f"‖W − tr(Γ⁻²)^(−1/4)Γ⁻¹‖/‖·‖ = {numbers['flow_w_dist']:.1e}",
        f"flow time {flow['time']:.1f}, |∇| = {flow['grad_norm']:.1e}, "
        f"u² − ‖W‖² {flow['balance_start']:.1e} → {flow['balance_end']:.1e}"])

    # SGD (the discretised flow) for Λ = I; Adam for the anisotropic Λ, whose small-eigenvalue
    # direction SGD at a stable step size has not settled in 2000 steps (0.8% off).
    aniso = TaskParams.zfb(cov_diag=(0.5, 0.75, 1.0, 1.5, 2.0))
    for label, t, opt in (("isotropic Λ = I", task, {}),
                          ("anisotropic Λ = diag(0.5, 0.75, 1, 1.5, 2)", aniso, {"optimizer": "adam", "lr": 0.003})):
        tp = TrainParams.for_kind("lsa", steps=500 if quick else 2000, batch=1024 if quick else 4096, **opt)
        tag = "iso" if t is task else "aniso"
        run, secs = _train(rep, t, ModelParams(kind="lsa", sigma=0.5, seed=0), tp, f"lsa-{tag}")
        found = lsa_check(run.model, t, run.probes)
        rep.figure(figures.lsa_distance_curve(run, title=f"LSA ({label}): product against Γ⁻¹"),
                   f"lsa_distance_{tag}")
        prompts = sample(t, 50_000, seed=99)  # paired: the model and the closed form on the same prompts
        found |= {"train_seconds": run.meta["seconds"],
                  "model_mse": float(((predict(run.model, prompts) - prompts.clean) ** 2).mean()),
                  "theorem_mse": float(((lsa_theory_predict(prompts, t) - prompts.clean) ** 2).mean()),
                  "population_mse": float(2 * lsa_population_loss(torch.tensor(1.0, dtype=torch.float64),
                                                                  lsa_optimum(t), t))}
        rep.section(f"LSA trained on sampled prompts, {label}", secs, found, [
            f"{tp.optimizer} lr {tp.lr} {tp.schedule}, batch {tp.batch}, {tp.steps} steps, ½MSE; "
            f"trained in {run.meta['seconds']:.1f} s",
            f"‖P − Γ⁻¹‖/‖Γ⁻¹‖ = {found['dist']:.3%}   vs ‖P − Γ₀⁻¹‖/‖Γ₀⁻¹‖ = {found['dist_variant']:.3%} "
            f"(Γ⁻¹ and Γ₀⁻¹ differ by {found['gap']:.3%})",
            f"along Γ⁻¹: P = (1 {found['scale']:+.3%})·Γ⁻¹; Γ₀⁻¹ = (1 {found['scale_variant']:+.3%})·Γ⁻¹",
            f"predictions on probes vs the theorem's ŷ: {found['pred_dist']:.3%}; "
            f"weight off ZFB's blocks {found['off_block']:.2%}",
            f"test MSE on 50k prompts: model {found['model_mse']:.4f}, theorem's predictor {found['theorem_mse']:.4f} "
            f"(population value {found['population_mse']:.4f})"])


def heads_section(rep: Report, quick: bool) -> dict:
    """He et al.'s patterns for 1, 2, 4 and 8 softmax heads, and 2 heads over init seeds."""
    task = TaskParams.he()
    steps = 1500 if quick else 6000
    models = {}
    for heads in (1, 2, 4, 8):
        run, secs = _train(rep, task, ModelParams(kind="softmax", heads=heads, seed=0),
                           TrainParams.for_kind("softmax", steps=steps), f"softmax-{heads}h")
        found = pattern_summary(run.history["kq"][-1], run.history["ov"][-1])
        m = head_measures(run.history["kq"][-1], run.history["ov"][-1])
        found |= {"eval_clean_mse": float(run.history["eval_clean_mse"][-1]), "omega": m["omega"].tolist(),
                  "mu": m["mu"].tolist(), "train_seconds": run.meta["seconds"]}
        models[heads] = run
        rep.figure(figures.training_curves(run), f"training_softmax-{heads}h")
        rep.figure(figures.weights_over_training(run), f"weights_softmax-{heads}h")
        rep.section(f"softmax, H = {heads} (Adam 1e-3, batch 256, {steps} steps, model seed 0)", secs, found, [
            f"clean MSE {found['eval_clean_mse']:.4f}; active heads {found['active']}/{heads}; "
            f"trained in {found['train_seconds']:.1f} s",
            f"KQ identity {found['kq_identity']:.3f}, OV last-entry {found['ov_last']:.3f}, zero-sum |Σμ|/Σ|μ| "
            f"{found['zero_sum']:.3f}, sign(ω)=sign(μ) {found['sign_agree']:.2f}",
            "ω_h " + ", ".join(f"{v:+.3f}" for v in found["omega"])
            + "; μ_h " + ", ".join(f"{v:+.2f}" for v in found["mu"]),
            f"debiased-GD step Σωμ = {found['dgd_step']:.3f}, bias Σμ = {found['bias']:+.3f}"])

    start, rows, lines = time.perf_counter(), [], []
    for seed in range(4):
        model = ModelParams(kind="softmax", heads=2, seed=seed)
        run = models[2] if seed == 0 else train(task, model, TrainParams.for_kind("softmax", steps=steps),
                                                 out=rep.out / "runs" / f"softmax-2h-seed{seed}", progress=False)
        found = pattern_summary(run.history["kq"][-1], run.history["ov"][-1])
        mu0 = build(model, task).ov()[:, -1]
        rows.append({"seed": seed, "mse": float(run.history["eval_clean_mse"][-1]), "zero_sum": found["zero_sum"],
                     "init_mu_signs": [int(s) for s in mu0.sign().tolist()], "run": run})
        lines.append(f"seed {seed}: initial μ signs {rows[-1]['init_mu_signs']} → clean MSE {rows[-1]['mse']:.4f}, "
                     f"zero-sum {found['zero_sum']:.3f}")
    best = min(rows, key=lambda r: r["mse"])
    lines.append(f"best seed {best['seed']} is the 2-head model used below")
    rep.section("softmax, H = 2 over initial weights", time.perf_counter() - start,
                {"seeds": [{k: v for k, v in r.items() if k != "run"} for r in rows]}, lines)
    models[2] = best["run"]
    return models


def errors_section(rep: Report, heads: dict, quick: bool) -> None:
    """Error against N for the models and baselines; the debiased-GD reading; length generalisation; shift."""
    task = TaskParams.he()
    batch = 2048 if quick else 8192
    start = time.perf_counter()
    named = {f"softmax-{h}h": heads[h].model for h in (1, 2, 4, 8)}
    table = errors_vs_n(named, task, (5, 10, 20, 40, 80, 160), batch=batch)
    s = pattern_summary(heads[2].history["kq"][-1], heads[2].history["ov"][-1])
    agree = dgd_agreement(heads[2].model, task, s["dgd_step"], s["bias"], batch=batch)
    rep.figure(figures.error_curves(table, title="He et al. task: MSE against N (trained at N = 40)", train_n=40),
               "errors_vs_n")
    lines = ["N          " + "  ".join(f"{n:>8}" for n in table["n"])]
    lines += [f"{k:<12}" + "  ".join(f"{v:8.4g}" for v in vals) for k, vals in table.items() if k != "n"]
    lines.append(f"2-head model vs its implied debiased GD (step {s['dgd_step']:.3f}, bias {s['bias']:+.3f}): "
                 f"relative gap {agree['rel_gap']:.3f}; MSE model {agree['model_mse']:.4f}, DGD {agree['dgd_mse']:.4f}")
    rep.section("error against N (clean target, σ² = 0.1 left out)", time.perf_counter() - start,
                {"table": table, "dgd_agreement": agree}, lines)

    steps = 1500 if quick else 6000
    start = time.perf_counter()
    linear = {}
    for kind in ("linear", "linear_mean"):
        run = train(task, ModelParams(kind=kind, heads=2, seed=0), TrainParams.for_kind(kind, steps=steps),
                    out=rep.out / "runs" / f"{kind}-2h", progress=False)
        linear[f"{kind}-2h"] = run.model
    table = errors_vs_n({"softmax-2h": heads[2].model, **linear}, task, (40, 80, 160, 320, 640), batch=batch // 2)
    rep.figure(figures.error_curves(table, title="Length generalisation: trained at N = 40", train_n=40), "length")
    lines = ["N              " + "  ".join(f"{n:>8}" for n in table["n"])]
    lines += [f"{k:<15}" + "  ".join(f"{v:8.4g}" for v in vals) for k, vals in table.items()
              if k in ("softmax-2h", "linear-2h", "linear_mean-2h", "ridge")]
    rep.section("length generalisation, softmax against linear heads (2 heads each)", time.perf_counter() - start,
                {"table": table}, lines)

    start = time.perf_counter()
    scales = (0.5, 1.0, 1.5, 2.0)
    lsa_run = train(TaskParams.zfb(), ModelParams(kind="lsa", sigma=0.5, seed=0),
                    TrainParams.for_kind("lsa", steps=500 if quick else 2000, batch=1024 if quick else 4096),
                    out=rep.out / "runs" / "lsa-iso", progress=False)
    zfb = covariate_shift({"lsa": lsa_run.model}, TaskParams.zfb(), scales, batch=batch)
    he = covariate_shift({"softmax-2h": heads[2].model, "linear_mean-2h": linear["linear_mean-2h"]}, task, scales,
                         batch=batch)
    rep.figure(figures.shift_slopes(zfb, title="ZFB task: slope of ŷ under covariate scale c"), "shift_lsa")
    rep.figure(figures.shift_slopes(he, title="He et al. task: slope of ŷ under covariate scale c"), "shift_heads")
    lines = ["c               " + "  ".join(f"{c:>16}" for c in scales) + "   (MSE / slope)"]
    for label, table in (("ZFB task (noiseless, w ~ N(0, I))", zfb), ("He et al. task (σ² = 0.1)", he)):
        lines.append(label)
        lines += [f"  {k:<14}" + "  ".join(f"{m:9.3g}/{sl:6.3f}" for m, sl in zip(v["mse"], v["slope"]))
                  for k, v in table.items() if k != "scale"]
    ratio = [sl / zfb["lsa"]["slope"][1] for sl in zfb["lsa"]["slope"]]
    lines.append("LSA slope / slope at c = 1: " + ", ".join(f"{r:.3f}" for r in ratio) + "  (c² = "
                 + ", ".join(f"{c * c:.2f}" for c in scales) + ")")
    rep.section("covariate shift x → c·x at test time", time.perf_counter() - start,
                {"zfb": zfb, "he": he, "lsa_slope_ratio": ratio}, lines)


def run_report(out: Path, *, quick: bool = False, threads: int = 1) -> dict:
    """Every check of the ICL report at the papers' sizes (quick: a smoke run); writes out/report.json and figures."""
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out)
    lsa_section(rep, quick)
    heads = heads_section(rep, quick)
    errors_section(rep, heads, quick)
    rep.save()
    print(f"\ntotal {rep.data['total_seconds']} s; wrote {out}/report.json and figures")
    return rep.data


if __name__ == "__main__":  # `python -m headlab.icl.report ...` is `headlab icl report ...`
    import sys

    from headlab.cli import main

    raise SystemExit(main(["icl", "report", *sys.argv[1:]]))
