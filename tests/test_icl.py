"""headlab.icl: the prompt generator, the models against naive references, the theory checks
(LSA closed form by the exact population flow and by SGD training), the softmax-head measures,
the baselines, resumable training and the `icl train` command."""

from __future__ import annotations

import math

import pytest
import torch

from headlab.icl import (
    CheckpointMismatchError,
    HeadAttention,
    ICLRun,
    ModelParams,
    Shift,
    TaskParams,
    TrainParams,
    baselines,
    build,
    covariate_shift,
    errors_vs_n,
    gamma,
    head_measures,
    lsa_check,
    lsa_optimum,
    lsa_population_flow,
    lsa_population_loss,
    pattern_summary,
    predict,
    sample,
    train,
)
from headlab.icl import training as train_module
from headlab.icl.theory import rel_dist

ANISO = (0.5, 0.75, 1.0, 1.5, 2.0)


def test_generator_statistics():
    task = TaskParams(d=5, n=8, noise_var=0.3, task_var=0.2, cov_diag=ANISO, query_noise=True)
    p = sample(task, 40_000, seed=0)
    assert p.x.shape == (40_000, 8, 5) and p.y.shape == (40_000, 8) and p.xq.shape == (40_000, 5)
    cov = torch.einsum("bni,bnj->ij", p.x.double(), p.x.double()) / (40_000 * 8)
    assert torch.allclose(cov, task.cov(), atol=0.03)
    assert torch.allclose(p.w.var(0).double(), torch.full((5,), 0.2, dtype=torch.float64), rtol=0.05)
    resid = p.y - torch.einsum("bnd,bd->bn", p.x, p.w)
    assert abs(resid.var().item() - 0.3) < 0.01
    assert abs((p.yq - p.clean).var().item() - 0.3) < 0.02
    z, zq = p.tokens()
    assert torch.equal(z[..., :5], p.x) and torch.equal(z[..., 5], p.y)
    assert torch.equal(zq[:, :5], p.xq) and not zq[:, 5].any()
    clean = sample(TaskParams.zfb(), 100, seed=1)
    assert torch.equal(clean.yq, clean.clean)
    shifted = sample(task, 40_000, seed=0, shift=Shift(x_scale=2.0, task_mean=1.0))
    assert torch.allclose(shifted.x, 2 * p.x) and abs(shifted.w.mean().item() - 1.0) < 0.01


def _reference_heads(m: HeadAttention, z, zq):
    """He et al.'s layer written out: per-head projections, softmax over the keys, O_h V_h."""
    out = torch.zeros(z.shape[0])
    for h in range(m.n_heads):
        q, k, v = zq @ m.w_q[h].T, z @ m.w_k[h].T, z @ m.w_v[h].T  # [B, D], [B, N, D], [B, N, D]
        s = torch.einsum("bd,bnd->bn", q, k) / math.sqrt(z.shape[-1])
        a = {"softmax": s.softmax(-1), "linear": s, "linear_mean": s / z.shape[1]}[m.attention]
        out = out + torch.einsum("bn,bnd->bd", a, v) @ m.w_o[h]
    return out


@pytest.mark.parametrize("kind", ["softmax", "linear", "linear_mean"])
@pytest.mark.parametrize("heads", [1, 3])
def test_heads_match_reference(kind, heads):
    task = TaskParams.he(n=13)
    m = build(ModelParams(kind=kind, heads=heads, seed=4), task)
    z, zq = sample(task, 7, seed=2).tokens()
    torch.testing.assert_close(m(z, zq), _reference_heads(m, z, zq), rtol=1e-5, atol=1e-5)
    # the read-outs reproduce the layer: ŷ = Σ_h OV_h Σ_j a_hj z_j with s = z_jᵀ KQ_h z_q / √D
    s = torch.einsum("bnj,hjk,bk->bhn", z, m.kq(), zq) / math.sqrt(task.dim)
    a = {"softmax": s.softmax(-1), "linear": s, "linear_mean": s / 13}[kind]
    torch.testing.assert_close(m(z, zq), torch.einsum("bhn,bnj,hj->b", a, z, m.ov()), rtol=1e-5, atol=1e-5)


def test_lsa_matches_reference_and_init():
    task = TaskParams.zfb(n=11)
    m = build(ModelParams(kind="lsa", sigma=0.4, seed=1), task)
    d = task.d
    assert abs(m.w_kq[:d, :d].norm().item() - 0.4) < 1e-6 and m.w_pv[d, d].item() == pytest.approx(0.4)
    assert m.w_kq.detach().norm() ** 2 == pytest.approx(0.16) and m.w_pv.detach().norm() ** 2 == pytest.approx(0.16)
    with torch.no_grad():  # any weights: f(E) = E + W^PV E (Eᵀ W^KQ E)/N, ŷ = its bottom-right entry
        m.w_kq.normal_()
        m.w_pv.normal_()
    z, zq = sample(task, 5, seed=3).tokens()
    e = torch.cat([z, zq[:, None]], 1).mT  # [B, D, N+1]
    f = e + m.w_pv @ e @ (e.mT @ m.w_kq @ e) / 11
    torch.testing.assert_close(m(z, zq), f[:, -1, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", [TaskParams.zfb(n=10), TaskParams(d=5, n=10, noise_var=0.2, task_var=0.5,
                                                                    cov_diag=ANISO, query_noise=True)],
                         ids=["zfb", "noisy-aniso"])
def test_population_loss_matches_monte_carlo(task):
    g = torch.Generator().manual_seed(0)
    u, w = torch.tensor(0.8, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64) * 0.3
    p = sample(task, 400_000, seed=5)
    h = (p.y.double()[..., None] * p.x.double()).mean(1)
    sq = 0.5 * (u * torch.einsum("bi,ij,bj->b", h, w, p.xq.double()) - p.yq.double()) ** 2
    se = sq.std() / math.sqrt(len(sq))
    assert abs(sq.mean() - lsa_population_loss(u, w, task)) < 4 * se


def test_population_flow_reaches_theorem_4_1():
    task = TaskParams.zfb()
    init = build(ModelParams(kind="lsa", sigma=0.5, seed=0), task)
    flow = lsa_population_flow(task, float(init.w_pv[-1, -1].detach()), init.w_kq.detach()[:5, :5])
    g_inv = torch.linalg.inv(gamma(task))
    assert rel_dist(flow["product"], lsa_optimum(task)) < 1e-9
    assert rel_dist(flow["product"], g_inv) < 1e-9  # noiseless: the optimum is Γ⁻¹ itself
    gap = rel_dist(lsa_optimum(task, variant="no_1_over_n"), g_inv)
    assert gap == pytest.approx(1 / (40 + 5), rel=1e-9)  # Λ = I: Γ₀⁻¹ = (1 + 1/(N + d))·Γ⁻¹, 2.2% apart
    u_star = torch.trace(g_inv @ g_inv) ** 0.25  # the balanced factors the theorem names
    assert flow["u"] == pytest.approx(float(u_star), rel=1e-5)
    assert rel_dist(flow["w"], g_inv / u_star) < 1e-5
    assert abs(flow["balance_end"] - flow["balance_start"]) < 1e-4


def test_sgd_trained_lsa_matches_closed_form():
    """The real check: the LSA module trained by SGD on sampled prompts (8 s on one core)."""
    task = TaskParams.zfb()
    run = train(task, ModelParams(kind="lsa", sigma=0.5, seed=0),
                TrainParams.for_kind("lsa", steps=2000, batch=1024), progress=False)
    found = lsa_check(run.model, task, run.probes)
    assert found["dist"] < 0.008  # measured 0.38%; Γ⁻¹ and Γ₀⁻¹ are 2.2% apart
    assert found["dist_variant"] > 2.5 * found["dist"]
    assert abs(found["scale"]) < 0.004 and found["scale_variant"] - found["scale"] > 0.015
    assert found["pred_dist"] < 0.01 and found["off_block"] < 0.01


def _planted_heads(kappa: list[float], mu: list[float], d: int = 5) -> HeadAttention:
    m = HeadAttention(d, len(kappa))
    dim = d + 1
    with torch.no_grad():
        for h, (k, u) in enumerate(zip(kappa, mu)):
            m.w_k[h] = torch.eye(dim)
            m.w_q[h] = torch.diag(torch.tensor([k] * d + [0.0]))
            m.w_v[h] = torch.eye(dim)
            m.w_o[h] = torch.zeros(dim)
            m.w_o[h, -1] = u
    return m


def test_pattern_measures_on_planted_heads():
    m = _planted_heads([0.3, -0.3, 0.0], [2.0, -2.0, 0.0])
    found = head_measures(m.kq(), m.ov())
    torch.testing.assert_close(found["omega"], torch.tensor([0.3, -0.3, 0.0]) / math.sqrt(6))
    assert torch.allclose(found["kq_identity"][:2], torch.ones(2))
    assert torch.allclose(found["ov_last"][:2], torch.ones(2))
    s = pattern_summary(m.kq(), m.ov())
    assert s["active"] == 2 and s["zero_sum"] == 0 and s["sign_agree"] == 1
    assert s["dgd_step"] == pytest.approx(2 * 2.0 * 0.3 / math.sqrt(6), rel=1e-6)
    with torch.no_grad():  # an off-diagonal KQ entry and an x-reading OV entry lower both measures
        m.w_q[0, 0, 1] = 0.3
        m.w_o[0, 0] = 1.0
    found = head_measures(m.kq(), m.ov())
    assert found["kq_identity"][0] < 0.9 and found["ov_last"][0] == pytest.approx(0.8)


def test_two_softmax_heads_learn_the_patterns():
    """He et al.'s patterns on a trained 2-head model (init seed with opposite μ signs; ~6 s)."""
    task = TaskParams.he()
    run = train(task, ModelParams(kind="softmax", heads=2, seed=2), TrainParams.for_kind("softmax", steps=3000),
                progress=False)
    s = pattern_summary(run.history["kq"][-1], run.history["ov"][-1])
    assert s["active"] == 2 and s["sign_agree"] == 1.0
    assert s["kq_identity"] > 0.9 and s["ov_last"] > 0.95 and s["zero_sum"] < 0.1
    assert float(run.history["eval_clean_mse"][-1]) < 0.2  # the one-head plateau is 0.30


@pytest.mark.parametrize("n", [5, 12])
def test_ols_exact_on_noiseless_data(n):
    p = sample(TaskParams.zfb(n=n), 500, seed=n)
    torch.testing.assert_close(baselines.ols(p), p.clean, rtol=1e-3, atol=1e-3)


def test_ridge_is_the_bayes_posterior_mean():
    task = TaskParams.he(n=8)
    p = sample(task, 20_000, seed=1)
    ridge = baselines.ridge(p, task.ridge_penalty())
    torch.testing.assert_close(ridge, baselines.posterior_mean(p, task), rtol=1e-5, atol=1e-5)
    err = {f: float(((baselines.ridge(p, f * task.ridge_penalty()) - p.clean) ** 2).mean()) for f in (0.5, 1, 2)}
    assert err[1] < err[0.5] and err[1] < err[2]
    assert torch.equal(baselines.ridge(p, 0.0), baselines.ols(p))


def test_optimal_gd_step_matches_monte_carlo():
    task = TaskParams(d=5, n=20, noise_var=0.1, task_var=0.2, cov_diag=ANISO)
    p = sample(task, 200_000, seed=2)
    fitted = baselines.fit_step(baselines.gd_one_step(p, 1.0), p.clean)
    assert fitted == pytest.approx(baselines.optimal_gd_step(task), rel=0.02)


def test_error_tables_and_covariate_shift_on_planted_lsa():
    task = TaskParams.zfb()
    lsa = build(ModelParams(kind="lsa"), task)
    with torch.no_grad():  # plant Theorem 4.1's limit
        lsa.w_kq.zero_()
        lsa.w_kq[:5, :5] = lsa_optimum(task).float()
        lsa.w_pv.zero_()
        lsa.w_pv[5, 5] = 1.0
    table = errors_vs_n({"lsa": lsa}, task, (10, 40), batch=512)
    assert set(table) == {"n", "lsa", "ols", "ridge", "gd", "debiased_gd"} and len(table["lsa"]) == 2
    assert table["gd"][1] == pytest.approx(table["lsa"][1], rel=1e-4)  # Λ = I: Γ⁻¹ is the optimal GD step
    shift = covariate_shift({"lsa": lsa}, task, (0.5, 1.0, 2.0), batch=20_000)
    ratios = [s / shift["lsa"]["slope"][1] for s in shift["lsa"]["slope"]]
    assert ratios == pytest.approx([0.25, 1.0, 4.0], rel=0.05)  # ŷ grows like c²·⟨w, x_q⟩
    assert shift["ols"]["slope"] == pytest.approx([1.0, 1.0, 1.0], rel=1e-3)


def _same_run(a: ICLRun, b: ICLRun) -> None:
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    for k, v in a.history.items():
        assert torch.equal(v, b.history[k]) or torch.allclose(v, b.history[k], rtol=0, atol=0, equal_nan=True), k


@pytest.mark.parametrize("kind", ["softmax", "lsa"])
def test_interrupted_training_resumes_bit_identically(kind, tmp_path, monkeypatch):
    task = TaskParams.zfb() if kind == "lsa" else TaskParams.he()
    model, tp = ModelParams(kind=kind, heads=2, seed=3), TrainParams.for_kind(kind, steps=300, batch=64,
                                                                                checkpoint_every=50)
    whole = train(task, model, tp, progress=False)
    real_sample = train_module.sample

    def interrupted(task_, batch, **kw):
        if kw.get("seed") == train_module._data_seed(tp.seed, 130):
            raise KeyboardInterrupt
        return real_sample(task_, batch, **kw)

    monkeypatch.setattr(train_module, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(task, model, tp, out=tmp_path, progress=False)
    assert ICLRun.load(tmp_path).step == 100
    monkeypatch.setattr(train_module, "sample", real_sample)
    resumed = train(task, model, tp, out=tmp_path, progress=False)
    assert resumed.meta["resumed_at"] == [100]
    _same_run(whole, resumed)
    _same_run(whole, ICLRun.load(tmp_path))
    with pytest.raises(CheckpointMismatchError):
        train(task, ModelParams(kind=kind, heads=2, seed=4), tp, out=tmp_path, progress=False)


def test_constant_schedule_run_extends(tmp_path):
    task, model = TaskParams.he(), ModelParams(kind="softmax", heads=2)
    tp = TrainParams.for_kind("softmax", steps=200, batch=64, checkpoint_every=100)
    train(task, model, tp, out=tmp_path, progress=False)
    extended = train(task, model, TrainParams.for_kind("softmax", steps=300, batch=64, checkpoint_every=100),
                     out=tmp_path, progress=False)
    _same_run(train(task, model, TrainParams.for_kind("softmax", steps=300, batch=64, checkpoint_every=100),
                    progress=False), extended)


def _icl_cli():
    from headlab.cli import build_parser

    return build_parser()


def test_cli_train_writes_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["icl", "train", "--out", str(out), "--checkpoint-every", "100", "--batch", "64", "--no-progress"]
    args = _icl_cli().parse_args([*common, "--steps", "200", "--no-figures"])
    assert args.handler(args) == 0 and (out / "checkpoint.safetensors").exists() and (out / "run.json").exists()
    args = _icl_cli().parse_args([*common, "--steps", "300"])
    assert args.handler(args) == 0
    text = capsys.readouterr().out
    assert "resumed from step 200" in text and "patterns:" in text
    assert all((out / f).exists() for f in ("training.html", "weights.html"))
    run = ICLRun.load(out)
    assert run.step == 300 and run.history["kq"].shape == (4, 2, 6, 6) and run.history["probe_pred"].shape == (4, 32)
    args = _icl_cli().parse_args(["icl", "train", "--out", str(tmp_path / "lsa"), "--model", "lsa", "--steps", "100",
                                  "--batch", "256", "--no-progress"])
    assert args.handler(args) == 0 and "Γ⁻¹" in capsys.readouterr().out
    assert (tmp_path / "lsa" / "lsa_distance.html").exists()


def test_figures_have_a_frame_per_checkpoint():
    from headlab.viz import icl as figures

    run = train(TaskParams.he(), ModelParams(kind="softmax", heads=3),
                TrainParams.for_kind("softmax", steps=60, checkpoint_every=20), progress=False)
    weights = figures.weights_over_training(run)
    assert len(weights.layout.sliders[0].steps) == 4 and len(weights.data) == 4 * 6
    assert sum(t.visible for t in weights.data) == 6  # opens on the last checkpoint
    assert len(figures.training_curves(run).data) == 3 + 2 * 3 + 3
    table = errors_vs_n({"m": run.model}, TaskParams.he(), (10, 20), batch=64)
    assert len(figures.error_curves(table, train_n=40).data) == 5 + 1
    assert predict(run.model, run.probes).shape == (32,)
