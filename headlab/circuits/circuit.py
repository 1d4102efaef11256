"""Circuits as results: a task's important heads, each with its evidence and role, and the path-patching edges.

`discover(model, task, out=DIR)` runs, resumably, into DIR:

    patching.jsonl   exact patching, one line per finished head (resumed)
    patching/        the exact patching HeadScores (effect, ld)
    roles/           per-head role evidence (HeadScores: prev_token, induction, duplicate, direct, attention to the
                     task's answer / wrong token at the last position)
    edges.jsonl      path-patching edges between the circuit's heads (resumed per sender)
    circuit.json     the Circuit (the commit marker: written last)

Roles, from headlab's own measurements (thresholds in `RoleRules`):

- mover / negative mover: most of the head's effect is direct (its output's own logit-difference contribution at the
  last position, the final norm linearised at the clean point), positive or negative;
- previous-token / induction / duplicate-token: its attention on `[BOS] r r` (a random block repeated) from each
  token of the second copy to the previous token / the token after the first occurrence / the first occurrence;
- inhibition: not direct, and at the last position it attends mostly to a token equal to the wrong answer (IOI's S
  positions);
- other: none of these.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from headlab.circuits.patching import Edge, Prepared, exact_patching, path_patching, prepare
from headlab.circuits.reuse import top_heads
from headlab.heads import HeadRef, as_heads
from headlab.analyses.induction import repeated_tokens
from headlab.models.head_model import HeadModel
from headlab.models.layers import final_norm
from headlab.results import HeadScores, ResultError, append_jsonl, read_json, read_jsonl, write_json

CIRCUIT_FILE = "circuit.json"


@dataclass(frozen=True)
class RoleRules:
    """Thresholds of the role rules (attention scores are mean weights; `direct` is a share of the effect).

    Attributes:
        direct: a head whose direct effect is at least this share of its effect is a (negative) mover.
        prev_token: the mean attention to the previous token on `[BOS] r r` that makes a previous-token head.
        induction: the mean attention to the token after the first occurrence that makes an induction head.
        duplicate: the mean attention to the first occurrence that makes a duplicate-token head.
        attends: the mean attention at the last position to the wrong token that makes an inhibition head.
    """

    direct: float = 0.5
    prev_token: float = 0.4
    induction: float = 0.3
    duplicate: float = 0.3
    attends: float = 0.3


@dataclass
class CircuitHead:
    """One head of a circuit: its exact effect, role and the evidence behind the role.

    Attributes:
        head: the head.
        effect: its exact-patching effect (normalised logit-difference change).
        role: "mover", "negative mover", "induction", "duplicate-token", "previous-token", "inhibition" or "other".
        evidence: the role scores it was assigned from (effect, direct, prev_token, induction, duplicate,
            attends_answer, attends_wrong).
    """

    head: HeadRef
    effect: float
    role: str
    evidence: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """The head as a JSON-ready dict.

        Returns:
            {"head": "L3H1", "effect", "role", "evidence"}.
        """
        return {"head": str(self.head), "effect": self.effect, "role": self.role, "evidence": self.evidence}


@dataclass
class Circuit:
    """A task's circuit on one model: its heads (top `fraction` by |exact effect|) and the edges among them.

    Attributes:
        task: the task's name.
        model: the model's name.
        fraction: the share of all heads kept (by |exact effect|).
        heads: the circuit's heads, by (layer, head).
        edges: path-patching edges among them (empty when not measured).
        params: the DiscoverParams used, as a dict.
        meta: run facts (times, the patching's meta).
    """

    task: str
    model: str
    fraction: float
    heads: list[CircuitHead]
    edges: list[Edge] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def head_set(self) -> set[HeadRef]:
        """The circuit's heads as a set of HeadRefs."""
        return {h.head for h in self.heads}

    def roles(self) -> dict[str, list[str]]:
        """Role → the heads that play it.

        Returns:
            {role: ["L3H1", ...]}, heads in circuit order.
        """
        out: dict[str, list[str]] = {}
        for h in self.heads:
            out.setdefault(h.role, []).append(str(h.head))
        return out

    def to_json(self) -> dict[str, Any]:
        """The circuit as a JSON-ready dict (what `save` writes).

        Returns:
            {"task", "model", "fraction", "heads", "edges", "params", "meta"}.
        """
        return {"task": self.task, "model": self.model, "fraction": self.fraction,
                "heads": [h.to_json() for h in self.heads], "edges": [e.to_json() for e in self.edges],
                "params": self.params, "meta": self.meta}

    def save(self, folder: str | Path) -> Path:
        """Write `folder/circuit.json`.

        Args:
            folder: the folder (created if needed).

        Returns:
            The folder, as a Path.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / CIRCUIT_FILE, self.to_json())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Circuit":
        """A circuit saved by `save` / `discover`.

        Args:
            folder: the folder holding circuit.json.

        Returns:
            The Circuit.

        Raises:
            ResultError: circuit.json missing or damaged (the message names the file).
        """
        path = Path(folder) / CIRCUIT_FILE
        data = read_json(path)
        try:
            return cls(task=data["task"], model=data["model"], fraction=float(data["fraction"]),
                       heads=[CircuitHead(as_heads([h["head"]])[0], float(h["effect"]), h["role"], h["evidence"])
                              for h in data["heads"]],
                       edges=[Edge.from_json(e) for e in data["edges"]], params=data.get("params", {}),
                       meta=data.get("meta", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise ResultError(f"{path} is not a headlab circuit ({err!r})") from err

    def figure(self):
        """The circuit graph (plotly): heads placed by layer, coloured by role, edges by path-patching effect.

        Returns:
            A plotly Figure (`headlab.viz.circuits.circuit_graph`).
        """
        from headlab.viz.circuits import circuit_graph

        return circuit_graph([h.to_json() for h in self.heads], [e.to_json() for e in self.edges],
                             title=f"{self.task} circuit — {self.model}")


def repeat_scores(model: HeadModel, *, seq_len: int = 24, batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Previous-token, induction and duplicate-token scores `[L, H]` on `[BOS] r r` (r: `seq_len` random tokens)."""
    if model.max_context is not None:
        seq_len = max(2, min(seq_len, (model.max_context - 1) // 2))
    ids = repeated_tokens(model, seq_len=seq_len, batch=batch, seed=seed)
    run = model.run(ids, layers=range(model.n_layers))
    n = seq_len
    first = ids.shape[1] - 2 * n  # [BOS] first when the model has one
    second = torch.arange(first + n + 1, first + 2 * n)  # second copy, from its 2nd token
    out = {k: torch.zeros(model.n_layers, model.n_heads) for k in ("prev_token", "induction", "duplicate")}
    for layer in range(model.n_layers):
        pat = run.patterns(layer)  # [B, H, T, S]
        out["prev_token"][layer] = pat[:, :, second, second - 1].mean((0, 2))
        out["induction"][layer] = pat[:, :, second, second - n + 1].mean((0, 2))
        out["duplicate"][layer] = pat[:, :, second, second - n].mean((0, 2))
    return out


def direct_effects(model: HeadModel, prep: Prepared) -> torch.Tensor:
    """Each head's direct effect `[L, H]`: the change of its own contribution to the logit difference at the last
    position (through the out-projection, the final norm linearised at the clean point, the unembedding) when its
    output is patched, normalised like the total effect."""
    norm = final_norm(model)
    with torch.no_grad():
        resid = prep.inputs.resume(0, stop=model.n_layers)  # [N, T, d], before the final norm
    rows = torch.arange(len(prep.end))
    x = resid[rows, prep.end]  # [N, d]
    unembed = model.hf.get_output_embeddings().weight
    direction = (unembed[prep.tokens[:, 0]] - unembed[prep.tokens[:, 1]]).detach()  # [N, d]
    out = torch.zeros(model.n_layers, model.n_heads)
    d = model.head_dim
    for layer in range(model.n_layers):
        proj = model.out_proj(layer)
        w = proj.weight if model.spec.out_proj_kind == "linear" else proj.weight.T  # [d_model, H·D]
        dz = (prep.corrupt_run.records[layer].z - prep.clean_run.records[layer].z)[rows, prep.end]  # [N, H, D]
        for h in range(model.n_heads):
            contrib = (dz[:, h].to(w.dtype) @ w[:, h * d:(h + 1) * d].T).detach()  # [N, d_model]
            _, tangent = torch.func.jvp(norm, (x,), (contrib,))
            out[layer, h] = float((tangent * direction).sum(-1).mean().detach()) / prep.gap
    return out


def end_attention(model: HeadModel, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention `[L, H]` from the last position to the tokens equal to the answer, and to the wrong token."""
    ids = prep.clean.input_ids
    rows = torch.arange(len(prep.end))
    is_ans = (ids == prep.tokens[:, :1]) & prep.clean.attention_mask.bool()
    is_wrong = (ids == prep.tokens[:, 1:]) & prep.clean.attention_mask.bool()
    to_ans = torch.zeros(model.n_layers, model.n_heads)
    to_wrong = torch.zeros(model.n_layers, model.n_heads)
    for layer in range(model.n_layers):
        pat = prep.clean_run.patterns(layer)[rows, :, prep.end]  # [N, H, S]
        to_ans[layer] = (pat * is_ans[:, None]).sum(-1).mean(0)
        to_wrong[layer] = (pat * is_wrong[:, None]).sum(-1).mean(0)
    return to_ans, to_wrong


def assign_role(ev: dict[str, float], rules: RoleRules) -> str:
    """The role a head's evidence gives it (see the module docstring)."""
    effect, direct = ev["effect"], ev["direct"]
    if abs(effect) > 0 and direct / effect >= rules.direct:
        return "mover" if direct > 0 else "negative mover"
    if abs(direct) >= rules.direct * abs(effect) and direct < 0:
        return "negative mover"
    if ev["induction"] >= rules.induction:
        return "induction"
    if ev["duplicate"] >= rules.duplicate:
        return "duplicate-token"
    if ev["prev_token"] >= rules.prev_token:
        return "previous-token"
    if ev["attends_wrong"] >= rules.attends and ev["attends_wrong"] > ev["attends_answer"]:
        return "inhibition"
    return "other"


def role_scores(model: HeadModel, prep: Prepared, effect: torch.Tensor) -> HeadScores:
    """Every head's role evidence as a HeadScores "roles".

    Args:
        model: the HeadModel.
        prep: the task prepared by `prepare` (clean and corrupted runs).
        effect: `[L, H]` exact-patching effects.

    Returns:
        HeadScores (analysis "roles", primary "effect") with maps `[L, H]`: effect, direct (`direct_effects`),
        prev_token, induction, duplicate (on `[BOS] r r`), attends_answer, attends_wrong (at the last position).
    """
    maps = {"effect": effect.float(), "direct": direct_effects(model, prep)}
    maps.update(repeat_scores(model))
    maps["attends_answer"], maps["attends_wrong"] = end_attention(model, prep)
    return HeadScores(analysis="roles", model=model.name, maps=maps, primary="effect", meta={"task": prep.task})


@dataclass(frozen=True, kw_only=True)
class DiscoverParams:
    """Settings of `discover` (saved with the circuit).

    Attributes:
        n: prompts per task (read by callers that build the task, e.g. the CLI).
        seed: their seed.
        fraction: the share of heads kept in the circuit, by |exact effect|.
        edges: measure path-patching edges among the circuit's heads.
        edge_prompts: prompts used for the edges (the first ones).
        token_budget: tokens per batched forward of the patching runs.
        rules: the role thresholds.
    """

    n: int = 100
    seed: int = 0
    fraction: float = 0.05
    edges: bool = True
    edge_prompts: int = 20
    token_budget: int = 16384
    rules: RoleRules = RoleRules()


def discover(model: HeadModel, task: Any, *, params: DiscoverParams = DiscoverParams(), out: str | Path,
             progress: bool = True) -> Circuit:
    """Find a task's circuit: exact patching of every head, roles, path-patching edges among the circuit's heads.

    Args:
        model: the model.
        task: a `headlab.tasks.circuits.CircuitBatch` (clean/corrupted prompts, answer and wrong tokens).
        params: `DiscoverParams`.
        out: the result folder (resumed: finished heads and senders are not patched again).
        progress: progress bars.

    Returns:
        The Circuit (also written to `out/circuit.json`, with the patching and roles HeadScores beside it).

    Raises:
        PatchingError: a task whose prompts do not fit the patching (see `prepare`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prep = prepare(model, task)
    save_task(task, out)
    patching = exact_patching(model, prep, token_budget=params.token_budget, out=out / "patching.jsonl",
                              progress=progress)
    patching.save(out / "patching")
    effect = patching.maps["effect"]
    roles = role_scores(model, prep, effect)
    roles.save(out / "roles")
    chosen = sorted(top_heads(effect, params.fraction), key=lambda h: (h.layer, h.head))
    heads = []
    for h in chosen:
        ev = {k: float(v[h.layer, h.head]) for k, v in roles.maps.items()}
        heads.append(CircuitHead(h, ev["effect"], assign_role(ev, params.rules), ev))
    edges: list[Edge] = []
    if params.edges and len(chosen) > 1:
        edges = _edges(model, task, chosen, params, out / "edges.jsonl", progress)
    circuit = Circuit(task=prep.task, model=model.name, fraction=params.fraction, heads=heads, edges=edges,
                      params=asdict(params), meta={**patching.meta, "seconds_total": round(time.perf_counter() - start, 1),
                                                   "seconds_patching": patching.meta["seconds"]})
    circuit.save(out)
    return circuit


TASK_FILE = "task.json"


def save_task(task: Any, folder: str | Path) -> Path:
    """The task's prompts, answers and positions as `task.json` (what a circuit was found on, for viewing it later)."""
    data = {"task": task.task, "clean": list(task.clean), "corrupt": list(task.corrupt),
            "answer": torch.as_tensor(task.answer).tolist(), "wrong": torch.as_tensor(task.wrong).tolist(),
            "positions": {k: torch.as_tensor(v).tolist() for k, v in task.positions.items()}, "meta": task.meta}
    return write_json(Path(folder) / TASK_FILE, data)


def load_task(folder: str | Path) -> Any:
    """The CircuitBatch saved by `save_task` (a ResultError naming the file when it is missing or damaged)."""
    from headlab.tasks.circuits import CircuitBatch

    path = Path(folder) / TASK_FILE
    data = read_json(path)
    try:
        return CircuitBatch(task=data["task"], clean=data["clean"], corrupt=data["corrupt"],
                            answer=torch.tensor(data["answer"]), wrong=torch.tensor(data["wrong"]),
                            positions={k: torch.tensor(v) for k, v in data["positions"].items()},
                            meta=data.get("meta", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise ResultError(f"{path} is not a saved circuit task ({err!r})") from err


def _edges(model: HeadModel, task: Any, chosen: list[HeadRef], params: DiscoverParams, path: Path,
           progress: bool) -> list[Edge]:
    """Path-patching edges sender → receiver (q, k, v) among the circuit's heads, on the first `edge_prompts`
    prompts; resumed per sender from `path`."""
    done = {row["sender"]: [Edge.from_json(e) for e in row["edges"]] for row in read_jsonl(path)}
    sub = _subset(task, params.edge_prompts)
    prep = prepare(model, sub)
    edges = []
    for s in chosen:
        if str(s) in done:
            edges += done[str(s)]
            continue
        found = path_patching(model, prep, [s], chosen, token_budget=params.token_budget, progress=False)
        append_jsonl(path, [{"sender": str(s), "edges": [e.to_json() for e in found]}])
        edges += found
    return edges


def _subset(task: Any, n: int) -> Any:
    import dataclasses

    n = min(n, len(task.clean))
    return dataclasses.replace(task, clean=task.clean[:n], corrupt=task.corrupt[:n], answer=task.answer[:n],
                               wrong=task.wrong[:n], positions={k: v[:n] for k, v in task.positions.items()})


COMPARISON_FILE = "comparison.json"


def compare(folders: list[str | Path], *, fractions: tuple[float, ...] = (0.02, 0.05, 0.10), draws: int = 10000,
            seed: int = 0, out: str | Path | None = None) -> "Comparison":
    """Overlap of the circuits in `folders` (each written by `discover` on the same model), with both nulls.

    The shared heads are listed by role (from the first task's roles); the comparison is saved as
    `out/comparison.json` when `out` is given.

    Args:
        folders: circuit folders written by `discover`, one per task.
        fractions: the circuit sizes (shares of heads by |effect|) compared.
        draws: draws of each null distribution.
        seed: seed of the nulls.
        out: a folder to write comparison.json into.

    Returns:
        A Comparison: one PairOverlap per task pair and fraction; `meta["shared_roles"]` the shared heads' roles.

    Raises:
        ResultError: a folder without a finished circuit, or circuits of different models.
    """
    from headlab.circuits.reuse import Comparison, overlap

    circuits = [Circuit.load(f) for f in folders]
    if len({c.model for c in circuits}) != 1:
        raise ResultError(f"circuits of different models: {sorted({c.model for c in circuits})}")
    tasks = [c.task for c in circuits]
    if len(set(tasks)) != len(tasks):
        raise ResultError(f"the same task twice among {tasks}")
    effects = {c.task: HeadScores.load(Path(f) / "patching").maps["effect"] for c, f in zip(circuits, folders)}
    roles = {c.task: HeadScores.load(Path(f) / "roles") for c, f in zip(circuits, folders)}
    pairs = overlap(effects, fractions=fractions, draws=draws, seed=seed)
    rules = RoleRules(**circuits[0].params.get("rules", {}))
    by_role = []
    for p in pairs:
        for name in p.shared:
            h = as_heads([name])[0]
            ev = {k: float(v[h.layer, h.head]) for k, v in roles[p.a].maps.items()}
            by_role.append({"pair": f"{p.a} / {p.b}", "fraction": p.fraction, "head": name,
                            "role": assign_role(ev, rules)})
    comparison = Comparison(tasks=tasks, pairs=pairs, meta={"model": circuits[0].model, "draws": draws, "seed": seed,
                                                            "folders": [str(f) for f in folders],
                                                            "shared_roles": by_role})
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / COMPARISON_FILE, comparison.to_json())
    return comparison


def load_comparison(folder: str | Path) -> "Comparison":
    """A comparison written by `compare(..., out=folder)`.

    Args:
        folder: the folder holding comparison.json.

    Returns:
        The Comparison.

    Raises:
        ResultError: comparison.json missing or damaged.
    """
    from headlab.circuits.reuse import Comparison

    path = Path(folder) / COMPARISON_FILE
    try:
        return Comparison.from_json(read_json(path))
    except (KeyError, TypeError) as err:
        raise ResultError(f"{path} is not a headlab circuit comparison ({err!r})") from err
