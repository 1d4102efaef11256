"""Plotly figures of in-context regression runs: pure functions, data in, figure out."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from headlab.icl.theory import head_measures, lsa_optimum, rel_dist


def training_curves(run, *, title: str | None = None) -> go.Figure:
    """Loss, every head's ω_h and μ_h, and the pattern measures against the training step.

    Args:
        run: an ICLRun.
        title: the figure title (default: names the model).

    Returns:
        A plotly Figure.
    """
    h = run.history
    steps = h["steps"].tolist()
    m = head_measures(h["kq"], h["ov"])  # each [C, H]
    weight = (m["omega"] * m["mu"]).abs()
    share = weight / weight.sum(-1, keepdim=True).clamp_min(1e-30)
    mu = m["mu"].double()
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=("MSE", "ω_h (KQ diagonal / √D)", "μ_h (OV last entry)", "pattern measures"))
    fig.add_trace(go.Scatter(x=steps[1:], y=h["train_mse"][1:].tolist(), name="train (noisy target)"), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=h["eval_mse"].tolist(), name="eval (noisy target)"), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=h["eval_clean_mse"].tolist(), name="eval (clean target)"), 1, 1)
    palette = qualitative.Dark24
    for head in range(m["omega"].shape[1]):
        line = {"color": palette[head % len(palette)]}
        fig.add_trace(go.Scatter(x=steps, y=m["omega"][:, head].tolist(), name=f"ω head {head}", line=line,
                                 legendgroup=f"h{head}"), 2, 1)
        fig.add_trace(go.Scatter(x=steps, y=m["mu"][:, head].tolist(), name=f"μ head {head}", line=line,
                                 legendgroup=f"h{head}", showlegend=False), 3, 1)
    measures = {
        "KQ identity (weighted)": (share * m["kq_identity"]).sum(-1),
        "OV last-entry (weighted)": (share * m["ov_last"]).sum(-1),
        "zero-sum |Σμ|/Σ|μ|": (mu.sum(-1).abs() / mu.abs().sum(-1).clamp_min(1e-30)).float(),
    }
    for name, values in measures.items():
        fig.add_trace(go.Scatter(x=steps, y=values.tolist(), name=name), 4, 1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="step", row=4, col=1)
    fig.update_layout(title=title or f"{run.model_params.name}: training", height=950, width=820)
    return fig


def weights_over_training(run, *, title: str | None = None) -> go.Figure:
    """Every head's KQ `[D, D]` (top) and OV `[D]` (bottom) as heatmaps, with a slider over the checkpoints.

    The slider toggles trace visibility (no animation frames), so the figure opens on the last
    checkpoint in every renderer.

    Args:
        run: an ICLRun.
        title: the figure title (default: names the model).

    Returns:
        A plotly Figure.
    """
    kq, ov, steps = run.history["kq"], run.history["ov"], run.history["steps"].tolist()
    n_heads, dim = kq.shape[1], kq.shape[-1]
    labels = [f"x{i}" for i in range(dim - 1)] + ["y"]
    kq_max, ov_max = float(kq.abs().max()), float(ov.abs().max())
    fig = make_subplots(rows=2, cols=n_heads, row_heights=[0.78, 0.22], vertical_spacing=0.16,
                        subplot_titles=[f"{m} head {h}" for m in ("KQ", "OV") for h in range(n_heads)])
    last = len(steps) - 1
    for c in range(len(steps)):
        for head in range(n_heads):
            fig.add_trace(go.Heatmap(
                z=kq[c, head].tolist(), x=labels, y=labels, zmid=0, zmin=-kq_max, zmax=kq_max, visible=c == last,
                colorscale="RdBu_r", showscale=head == 0, colorbar={"title": "KQ", "len": 0.6, "y": 0.72},
                hovertemplate="key %{y} · query %{x}: %{z:.3f}<extra></extra>"), row=1, col=head + 1)
        for head in range(n_heads):
            fig.add_trace(go.Heatmap(
                z=[ov[c, head].tolist()], x=labels, y=["OV"], zmid=0, zmin=-ov_max, zmax=ov_max, visible=c == last,
                colorscale="PuOr_r", showscale=head == 0, colorbar={"title": "OV", "len": 0.3, "y": 0.12},
                hovertemplate="%{x}: %{z:.3f}<extra></extra>"), row=2, col=head + 1)
    per = 2 * n_heads
    slider = {"active": last, "currentvalue": {"prefix": "step "}, "pad": {"t": 50},
              "steps": [{"label": str(s), "method": "update",
                         "args": [{"visible": [i // per == c for i in range(per * len(steps))]}]}
                        for c, s in enumerate(steps)]}
    fig.update_yaxes(autorange="reversed", row=1)
    fig.update_layout(title=title or f"{run.model_params.name}: KQ and OV over training", sliders=[slider],
                      height=620, width=max(520, 300 * n_heads))
    return fig


def weights_at(kq, ov, *, step: int, title: str | None = None, kq_max: float | None = None,
               ov_max: float | None = None) -> go.Figure:
    """Every head's KQ `[D, D]` (top) and OV `[D]` (bottom) at one checkpoint, as heatmaps.

    Args:
        kq: the checkpoint's KQ matrices `[H, D, D]` (an ICLRun's `history["kq"][c]`).
        ov: the checkpoint's OV vectors `[H, D]`.
        step: the training step of the checkpoint (in the default title).
        title: the figure's title (default: "KQ and OV at step N").
        kq_max: the KQ colour range ±kq_max (default: this checkpoint's largest |KQ|; pass the whole run's so
            checkpoints compare).
        ov_max: the same for OV.

    Returns:
        A plotly figure: KQ heatmaps in the top row, OV strips below, one column per head.
    """
    n_heads, dim = kq.shape[0], kq.shape[-1]
    labels = [f"x{i}" for i in range(dim - 1)] + ["y"]
    kq_max = float(kq.abs().max()) if kq_max is None else kq_max
    ov_max = float(ov.abs().max()) if ov_max is None else ov_max
    fig = make_subplots(rows=2, cols=n_heads, row_heights=[0.78, 0.22], vertical_spacing=0.16,
                        subplot_titles=[f"{m} head {h}" for m in ("KQ", "OV") for h in range(n_heads)])
    for head in range(n_heads):
        fig.add_trace(go.Heatmap(
            z=kq[head].tolist(), x=labels, y=labels, zmid=0, zmin=-kq_max, zmax=kq_max, colorscale="RdBu_r",
            showscale=head == 0, colorbar={"title": "KQ", "len": 0.6, "y": 0.72},
            hovertemplate="key %{y} · query %{x}: %{z:.3f}<extra></extra>"), row=1, col=head + 1)
        fig.add_trace(go.Heatmap(
            z=[ov[head].tolist()], x=labels, y=["OV"], zmid=0, zmin=-ov_max, zmax=ov_max, colorscale="PuOr_r",
            showscale=head == 0, colorbar={"title": "OV", "len": 0.3, "y": 0.12},
            hovertemplate="%{x}: %{z:.3f}<extra></extra>"), row=2, col=head + 1)
    fig.update_yaxes(autorange="reversed", row=1)
    fig.update_layout(title=title or f"KQ and OV at step {step}", height=620, width=max(520, 300 * n_heads))
    return fig


def lsa_distance_curve(run, *, title: str | None = None) -> go.Figure:
    """‖W^PV_22·W^KQ_11 − Γ⁻¹‖/‖Γ⁻¹‖ over training, beside the distance to the (1+1/N)-less Γ₀⁻¹.

    Args:
        run: a trained LSA's ICLRun.
        title: the figure title (default: says what is compared).

    Returns:
        A plotly Figure.
    """
    task, d = run.task, run.task.d
    products = run.history["ov"][:, 0, -1, None, None] * run.history["kq"][:, 0, :d, :d]
    target, variant = lsa_optimum(task), lsa_optimum(task, variant="no_1_over_n")
    steps = run.history["steps"].tolist()
    fig = go.Figure([
        go.Scatter(x=steps, y=[rel_dist(p, target) for p in products], name="to Γ⁻¹ (Theorem 4.1)"),
        go.Scatter(x=steps, y=[rel_dist(p, variant) for p in products], name="to Γ₀⁻¹ (no (1+1/N))"),
    ])
    fig.update_layout(title=title or "LSA: trained product against the closed form", xaxis_title="step",
                      yaxis={"type": "log", "title": "relative Frobenius distance"}, height=420, width=720)
    return fig


def error_curves(table: dict, *, x: str = "n", title: str = "", x_title: str = "prompt length N",
                 train_n: int | None = None) -> go.Figure:
    """MSE of each model and baseline against N (or another x column), log scale.

    Args:
        table: `errors_vs_n`'s (or `covariate_shift`'s) table: the x column and, per name, MSEs (or {"mse": ...}).
        x: the x column's key.
        title: the figure title.
        x_title: the x-axis title.
        train_n: the training prompt length, marked by a dotted line (None: none).

    Returns:
        A plotly Figure.
    """
    fig = go.Figure()
    dash = {"ols": "dot", "ridge": "dot", "gd": "dash", "debiased_gd": "dash"}
    for name, values in table.items():
        if name == x:
            continue
        ys = values["mse"] if isinstance(values, dict) else values
        fig.add_trace(go.Scatter(x=table[x], y=ys, name=name, mode="lines+markers",
                                 line={"dash": dash.get(name, "solid")}))
    if train_n is not None:  # a trace, not a shape: shapes on log axes mis-place across plotly versions
        ys = [v for name, vals in table.items() if name != x
              for v in (vals["mse"] if isinstance(vals, dict) else vals) if v > 0]
        fig.add_trace(go.Scatter(x=[train_n, train_n], y=[min(ys), max(ys)], name=f"trained N = {train_n}",
                                 mode="lines", line={"dash": "dot", "color": "grey"}))
    fig.update_layout(title=title, xaxis={"title": x_title, "type": "log"},
                      yaxis={"title": "MSE against ⟨w, x_q⟩", "type": "log"}, height=440, width=720)
    return fig


def shift_slopes(table: dict, *, title: str = "") -> go.Figure:
    """The slope of ŷ on ⟨w, x_q⟩ against the covariate scale c, with c² for reference.

    Args:
        table: `covariate_shift`'s table.
        title: the figure title.

    Returns:
        A plotly Figure.
    """
    scales = table["scale"]
    fig = go.Figure()
    for name, values in table.items():
        if name != "scale":
            fig.add_trace(go.Scatter(x=scales, y=values["slope"], name=name, mode="lines+markers"))
    ref = next((v["slope"][scales.index(1.0)] for k, v in table.items() if k not in ("scale", "ols", "ridge")
                and 1.0 in scales), 1.0)
    fig.add_trace(go.Scatter(x=scales, y=[ref * c ** 2 for c in scales], name="c² × slope at c = 1",
                             line={"dash": "dot", "color": "grey"}))
    fig.update_layout(title=title, xaxis_title="covariate scale c", yaxis_title="slope of ŷ on ⟨w, x_q⟩",
                      height=420, width=720)
    return fig

