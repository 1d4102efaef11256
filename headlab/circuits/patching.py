"""Activation patching of heads on a clean/corrupted task: exact, path patching, and the fast screens AtP and AtP*.

The metric is the logit difference LD = logit(answer) − logit(wrong) at each prompt's last token. A head's effect is
the normalised change when its clean activation is replaced by the corrupted one (noising, as Wang et al. and Merullo
et al. patch):

    effect(h) = (mean LD_patched(h) − mean LD_clean) / (mean LD_corrupt − mean LD_clean)

so 0 = no effect, 1 = patching this head alone moves the model all the way to its corrupted behaviour, negative =
the head pushes the other way.

- `exact_patching`: every head patched alone, exactly. Only the layers from the head's on are rerun
  (`HeadModel.layer_inputs` → `LayerInputs.resume`), and the heads of a layer run side by side as copies of the
  batch, each copy patching its own head (`Patch(..., positions=<its rows>)`), so a 30-layer model costs about
  15 full batched forwards per head *layer*, not per head. Resumable: each finished head is appended to a JSONL file.
- `path_patching`: sender → receivers (Wang et al.): the sender patched, every other head frozen to its clean output,
  the receivers' q, k or v recorded, then the clean run with only those receiver inputs patched.
- `atp`: attribution patching, effect(h) ≈ Σ (z_corrupt − z_clean) · ∂LD/∂z over positions, one forward and one
  backward for every head.
- `atp_star`: AtP* (Kramár et al. 2024) for heads: the query / key terms with the softmax recomputed exactly
  (attention saturation: ∂LD/∂A · (A(patched) − A(clean)) instead of a gradient through the softmax), the value term
  linear; and GradDrop: AtP again with the gradient through each later layer dropped in turn, whose mean absolute value
  bounds effects that cancel across paths.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from headlab.edits import Add, Patch, edit
from headlab.errors import HeadlabError
from headlab.heads import HeadRef, as_heads
from headlab.models.head_model import HeadModel
from headlab.models.layers import LayerInputs, gradient_dropped
from headlab.results import HeadScores, append_jsonl, read_jsonl, run_meta
from headlab.run import Batch, Run


class PatchingError(HeadlabError, ValueError):
    """A task that cannot be patched (clean and corrupted prompts that do not line up, a degenerate metric)."""


@dataclass
class Prepared:
    """A task encoded for patching (what `prepare` returns).

    Clean and corrupted batches of equal shape, the answer tokens, the clean layer inputs, both runs (with every
    head's output) and both metrics.

    Attributes:
        task: the task's name.
        clean: the encoded clean batch `[N, T]`.
        corrupt: the encoded corrupted batch `[N, T]` (the same padding).
        end: `[N]` the position the metric reads.
        tokens: `[N, 2]` (answer, wrong) token ids.
        inputs: the clean forward's per-layer inputs (for `resume`).
        clean_run: the clean forward with z of every layer.
        corrupt_run: the corrupted forward with z of every layer.
        ld_clean: `[N]` clean logit differences (answer − wrong at `end`).
        ld_corrupt: `[N]` corrupted logit differences.
        buckets: the prompts grouped by token length, recorded without padding (exact patching reruns them).
    """

    task: str
    clean: Batch
    corrupt: Batch
    end: torch.Tensor
    tokens: torch.Tensor
    inputs: LayerInputs
    clean_run: Run
    corrupt_run: Run
    ld_clean: torch.Tensor
    ld_corrupt: torch.Tensor
    buckets: list["Bucket"] = field(default_factory=list)

    @property
    def gap(self) -> float:
        """mean LD_corrupt − mean LD_clean (the normaliser of every effect)."""
        return float(self.ld_corrupt.mean() - self.ld_clean.mean())

    def effect(self, ld: torch.Tensor) -> torch.Tensor:
        """Normalised effect of patched logit differences `[..., N]` → `[...]`.

        Args:
            ld: patched logit differences, prompts last.

        Returns:
            (mean LD_patched − mean LD_clean) / gap: 0 = no effect, 1 = the whole clean-to-corrupted change.
        """
        return (ld.mean(-1) - self.ld_clean.mean()) / self.gap


@dataclass
class Bucket:
    """The prompts of one token length, recorded without padding (exact patching reruns them: no work on pads).

    Attributes:
        rows: `[n]` their indices in the task.
        length: their token length.
        inputs: their clean forward's per-layer inputs.
    """

    rows: torch.Tensor
    length: int
    inputs: LayerInputs


def _ld(logits: torch.Tensor) -> torch.Tensor:
    return logits[..., 0] - logits[..., 1]


def prepare(model: HeadModel, task: Any) -> Prepared:
    """Encode a task and run the clean and corrupted forwards once.

    Args:
        model: an LM HeadModel.
        task: a `headlab.tasks.circuits.CircuitBatch` (clean, corrupt, answer, wrong, positions["end"]).

    Returns:
        The Prepared task.

    Raises:
        PatchingError: a model without an LM head, unequal numbers of prompts, clean and corrupted prompts whose tokens do not line up, an `end` that is not the last token,
            or a task on which clean and corrupted logit differences are equal (no effect can be normalised).
    """
    if not model.is_lm:
        raise PatchingError(f"{model.name} has no LM head: patching measures a logit difference")
    if len(task.clean) != len(task.corrupt) or not task.clean:
        raise PatchingError(f"task {task.task!r}: {len(task.clean)} clean and {len(task.corrupt)} corrupted prompts")
    clean, corrupt = model.encode(list(task.clean)), model.encode(list(task.corrupt))
    if clean.input_ids.shape != corrupt.input_ids.shape or not torch.equal(clean.attention_mask, corrupt.attention_mask):
        bad = next((i for i, (a, b) in enumerate(zip(clean.lengths, corrupt.lengths)) if a != b), 0)
        raise PatchingError(f"task {task.task!r}: clean and corrupted prompt {bad} have different token lengths "
                            f"({clean.lengths[bad]} vs {corrupt.lengths[bad]}): {task.clean[bad]!r} / "
                            f"{task.corrupt[bad]!r}")
    end = torch.as_tensor(task.positions["end"], dtype=torch.long)
    last = torch.tensor(clean.lengths) - 1
    if not torch.equal(end, last):
        bad = int((end != last).nonzero()[0, 0])
        raise PatchingError(f"task {task.task!r}: prompt {bad}'s 'end' position is {int(end[bad])}, but its last token "
                            f"is at {int(last[bad])}")
    tokens = torch.stack([torch.as_tensor(task.answer), torch.as_tensor(task.wrong)], dim=1).long()
    with torch.no_grad():
        inputs = model.layer_inputs(clean)
        clean_run = model.run(clean, layers=range(model.n_layers), with_z=True)
        corrupt_run = model.run(corrupt, layers=range(model.n_layers), with_z=True)
    rows = torch.arange(len(end))
    ld_clean = _ld(clean_run.logits[rows, end].gather(1, tokens)).float()
    ld_corrupt = _ld(corrupt_run.logits[rows, end].gather(1, tokens)).float()
    buckets = []
    lengths = torch.tensor(clean.lengths)
    with torch.no_grad():
        for length in sorted(set(clean.lengths)):
            idx = (lengths == length).nonzero().flatten()
            ids = clean.input_ids[idx, :length]
            buckets.append(Bucket(rows=idx, length=length, inputs=model.layer_inputs(ids)))
    out = Prepared(task=task.task, clean=clean, corrupt=corrupt, end=end, tokens=tokens, inputs=inputs,
                   clean_run=clean_run, corrupt_run=corrupt_run, ld_clean=ld_clean, ld_corrupt=ld_corrupt,
                   buckets=buckets)
    if abs(out.gap) < 1e-6:
        raise PatchingError(f"task {task.task!r}: clean and corrupted logit differences are equal "
                            f"({float(ld_clean.mean()):.3g}); no effect can be normalised")
    return out


def _copies_mask(copies: int, n: int, length: int, i: int, positions: torch.Tensor | None) -> torch.Tensor:
    """Bool `[copies·n, length]`: the rows of copy i (at `positions` `[n, length]` if given)."""
    mask = torch.zeros(copies, n, length, dtype=torch.bool)
    mask[i] = True if positions is None else positions
    return mask.view(copies * n, length)


def exact_patching(model: HeadModel, prep: Prepared, *, heads: Iterable[Any] | None = None,
                   token_budget: int = 16384, out: str | Path | None = None, progress: bool = True) -> HeadScores:
    """Patch each head's output alone from the corrupted run and measure the logit difference, exactly.

    Args:
        model: the model.
        prep: `prepare(model, task)`.
        heads: the heads to patch (all by default).
        token_budget: tokens per batched forward (copies × prompts × length) — the heads of one layer share forwards.
        out: a JSONL file of finished heads (resumed: heads already there are not patched again).
        progress: a progress bar over heads.

    Returns:
        HeadScores "patching" with maps `effect` (primary) and `ld` (mean patched LD; NaN for heads not patched), items
        `ld` `[L, H, N]` and the clean / corrupted LDs.
    """
    refs = model.heads() if heads is None else as_heads(heads)
    model.check_heads(refs)
    n, length = prep.clean.input_ids.shape
    lds = torch.full((model.n_layers, model.n_heads, n), float("nan"))
    path = Path(out) if out is not None else None
    if path is not None:
        for row in read_jsonl(path):
            if row.get("task") == prep.task and len(row["ld"]) == n:
                lds[row["layer"], row["head"]] = torch.tensor(row["ld"])
    todo = [r for r in refs if bool(torch.isnan(lds[r.layer, r.head]).any())]
    start = time.perf_counter()
    bar = tqdm(total=len(refs), initial=len(refs) - len(todo), desc=f"patching {prep.task}", disable=not progress,
               leave=False)
    by_layer: dict[int, list[HeadRef]] = {}
    for r in todo:
        by_layer.setdefault(r.layer, []).append(r)
    for layer in sorted(by_layer):  # a layer's heads are written together, once every bucket has run
        layer_heads = by_layer[layer]
        for bucket in prep.buckets:
            size, length = len(bucket.rows), bucket.length
            per_forward = max(1, token_budget // (size * length))
            end = torch.full((size,), length - 1)
            tokens = prep.tokens[bucket.rows]
            for at in range(0, len(layer_heads), per_forward):
                chunk = layer_heads[at: at + per_forward]
                copies = len(chunk)
                edits = [Patch(h, z=prep.corrupt_run.z(h)[bucket.rows, :length].repeat(copies, 1, 1),
                               positions=_copies_mask(copies, size, length, i, None)) for i, h in enumerate(chunk)]
                with torch.no_grad(), edit(model, edits):
                    hidden = bucket.inputs.resume(layer, copies=copies)
                    ld = _ld(bucket.inputs.unembed(hidden, end, tokens)).float().view(copies, size)
                for i, h in enumerate(chunk):
                    lds[h.layer, h.head, bucket.rows] = ld[i]
        if path is not None:
            append_jsonl(path, [{"task": prep.task, "layer": h.layer, "head": h.head,
                                 "ld": lds[h.layer, h.head].tolist()} for h in layer_heads])
        bar.update(len(layer_heads))
    bar.close()
    seconds = time.perf_counter() - start
    scores = _scores(model, prep, "patching", lds, params={"method": "exact", "positions": "all",
                                                            "token_budget": token_budget}, seconds=seconds)
    scores.meta["heads_patched_this_run"] = len(todo)  # `seconds` covers these; the rest were read back
    return scores


def _scores(model: HeadModel, prep: Prepared, analysis: str, lds: torch.Tensor | None, *, params: dict,
            seconds: float, effect: torch.Tensor | None = None, extra: dict[str, torch.Tensor] | None = None
            ) -> HeadScores:
    if effect is None:
        effect = prep.effect(lds)
    maps = {"effect": effect.float()}
    items = {"ld_clean": prep.ld_clean, "ld_corrupt": prep.ld_corrupt}
    if lds is not None:
        maps["ld"] = lds.mean(-1)
        items["ld"] = lds
    maps.update(extra or {})
    meta = run_meta(model, task=prep.task, n_prompts=len(prep.end), seconds=round(seconds, 2),
                    ld_clean=float(prep.ld_clean.mean()), ld_corrupt=float(prep.ld_corrupt.mean()),
                    accuracy_clean=float((prep.ld_clean > 0).float().mean()),
                    accuracy_corrupt=float((prep.ld_corrupt > 0).float().mean()))
    return HeadScores(analysis=analysis, model=model.name, maps=maps, primary="effect", params=params, meta=meta,
                      items=items)


# path patching


@dataclass(frozen=True)
class Edge:
    """A path-patching edge: sender's output → receiver's q, k or v input, with its normalised effect.

    Attributes:
        sender: the head whose output is patched.
        receiver: the head (in a later layer) whose input carries the change.
        channel: "q", "k" or "v".
        effect: the normalised effect (as `Prepared.effect`).
    """

    sender: HeadRef
    receiver: HeadRef
    channel: str
    effect: float

    def to_json(self) -> dict[str, Any]:
        """The edge as a JSON-ready dict.

        Returns:
            {"sender": "L3H1", "receiver", "channel", "effect"}.
        """
        return {"sender": str(self.sender), "receiver": str(self.receiver), "channel": self.channel,
                "effect": self.effect}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Edge":
        """Rebuild an edge from `to_json`'s dict.

        Args:
            data: {"sender", "receiver", "channel", "effect"}.

        Returns:
            The Edge.
        """
        return cls(as_heads([data["sender"]])[0], as_heads([data["receiver"]])[0], data["channel"],
                   float(data["effect"]))


CHANNELS = ("q", "k", "v")


def path_patching(model: HeadModel, prep: Prepared, senders: Iterable[Any], receivers: Iterable[Any], *,
                  channels: Iterable[str] = CHANNELS, token_budget: int = 16384, progress: bool = True
                  ) -> list[Edge]:
    """Path patching (Wang et al. 2022) of every sender → every later receiver, per input channel.

    For each sender: run the clean prompts from the sender's layer with the sender's output taken from the corrupted
    run and every other head's output frozen to its clean value (MLPs recompute), recording the receivers' q, k, v;
    then rerun the clean prompts from the receiver's layer with only that receiver's `channel` input replaced by the
    recorded one. The edge's effect is normalised like `exact_patching`'s. Senders run side by side as batch copies.

    Args:
        model: the model.
        prep: `prepare(model, task)`.
        senders: heads whose output is patched (HeadRefs, pairs or "L3H1").
        receivers: heads whose inputs carry the change (only those in later layers than a sender count).
        channels: some of "q", "k", "v".
        token_budget: tokens per batched forward (copies × prompts × length).
        progress: a progress bar over senders.

    Returns:
        One Edge per (sender, receiver, channel) with the receiver in a later layer than the sender.

    Raises:
        PatchingError: channels not among q, k, v (or none).
        HeadIndexError: a head out of range.
    """
    senders, receivers = as_heads(list(senders)), as_heads(list(receivers))
    model.check_heads(senders + receivers)
    channels = tuple(channels)
    bad = [c for c in channels if c not in CHANNELS]
    if bad or not channels:
        raise PatchingError(f"path patching channels must be among {CHANNELS}, got {channels!r}")
    n, length = prep.clean.input_ids.shape
    per_forward = max(1, token_budget // max(1, n * length))
    by_layer: dict[int, list[HeadRef]] = {}
    for s in senders:
        if any(r.layer > s.layer for r in receivers):
            by_layer.setdefault(s.layer, []).append(s)
    total = sum(len(v) for v in by_layer.values())
    bar = tqdm(total=total, desc=f"path patching {prep.task}", disable=not progress, leave=False)
    edges: list[Edge] = []
    for layer in sorted(by_layer):
        later = [r for r in receivers if r.layer > layer]
        last = max(r.layer for r in later)
        frozen_layers = range(layer, last + 1)
        for at in range(0, len(by_layer[layer]), per_forward):
            chunk = by_layer[layer][at: at + per_forward]
            copies = len(chunk)
            freeze = [Patch(h, z=prep.clean_run.z(h).repeat(copies, 1, 1)) for li in frozen_layers
                      for h in model.heads([li])]
            sends = [Patch(s, z=prep.corrupt_run.z(s).repeat(copies, 1, 1),
                           positions=_copies_mask(copies, n, length, i, None)) for i, s in enumerate(chunk)]
            with torch.no_grad(), edit(model, freeze), edit(model, sends), \
                    model.capturing(layers={r.layer for r in later}) as cap:
                prep.inputs.resume(layer, copies=copies, stop=last + 1)
            for r in later:
                rec = cap.records[r.layer]
                group = model.kv_group(r)
                values = {"q": rec.q[:, r.head], "k": rec.k[:, group], "v": rec.v[:, group]}
                for channel in channels:
                    with torch.no_grad(), edit(model, Patch(r, **{channel: values[channel]})):
                        hidden = prep.inputs.resume(r.layer, copies=copies)
                        ld = _ld(prep.inputs.unembed(hidden, prep.end, prep.tokens)).float().view(copies, n)
                    effect = prep.effect(ld)
                    edges += [Edge(s, r, channel, float(effect[i])) for i, s in enumerate(chunk)]
            bar.update(copies)
    bar.close()
    return edges


# attribution patching


def _head_grads(model: HeadModel, prep: Prepared, *, drop_layer: int | None = None) -> dict[int, torch.Tensor]:
    """∂(Σ LD_clean)/∂z of every head at the clean point: per layer `[N, T, H, D]`."""
    deltas = {layer: torch.zeros_like(prep.clean_run.records[layer].z, dtype=torch.float32, requires_grad=True)
              for layer in range(model.n_layers)}
    # a zero added to every head's own output: the gradient reaches it through every path (downstream heads' q, k
    # and v included), which replacing the outputs by constants would cut
    edits = [Add(HeadRef(layer, h), delta=deltas[layer][:, :, h])
             for layer in range(model.n_layers) for h in range(model.n_heads)]
    scope = gradient_dropped(model, drop_layer) if drop_layer is not None else nullcontext()
    with torch.enable_grad(), edit(model, edits), scope:
        hidden = model.hf.base_model(input_ids=prep.clean.input_ids, attention_mask=prep.clean.attention_mask,
                                     use_cache=False).last_hidden_state
        ld = _ld(prep.inputs.unembed(hidden, prep.end, prep.tokens))
        ld.sum().backward()
    return {layer: d.grad if d.grad is not None else torch.zeros_like(d) for layer, d in deltas.items()}


def _atp_from_grads(model: HeadModel, prep: Prepared, grads: dict[int, torch.Tensor]) -> torch.Tensor:
    """Per-prompt AtP estimates of LD_patched − LD_clean `[L, H, N]`."""
    out = torch.zeros(model.n_layers, model.n_heads, len(prep.end))
    for layer, g in grads.items():
        dz = (prep.corrupt_run.records[layer].z - prep.clean_run.records[layer].z).float()  # [N, T, H, D]
        out[layer] = (dz * g).sum((1, 3)).T  # [H, N]
    return out


def atp(model: HeadModel, prep: Prepared) -> HeadScores:
    """Attribution patching: each head's effect from one forward and one backward (first order in Δz).

    Args:
        model: the model.
        prep: `prepare(model, task)`.

    Returns:
        HeadScores "atp" with `effect` normalised like `exact_patching` (items `delta` `[L, H, N]`: the per-prompt
        estimates of LD_patched − LD_clean).
    """
    start = time.perf_counter()
    delta = _atp_from_grads(model, prep, _head_grads(model, prep))
    scores = _scores(model, prep, "atp", None, params={"method": "atp"}, seconds=time.perf_counter() - start,
                     effect=delta.mean(-1) / prep.gap)
    scores.items["delta"] = delta
    return scores


def atp_star(model: HeadModel, prep: Prepared, *, grad_drop: bool = True, progress: bool = True) -> HeadScores:
    """AtP* for heads (Kramár et al. 2024): AtP with the attention-saturation fix for the query and key terms.

    The head's output change is split into its query, key and value terms. The query / key terms recompute the head's
    softmax exactly with the corrupted query (keys) and weigh the pattern change by ∂LD/∂A; the value term is linear.
    GradDrop reruns AtP once per later layer ℓ with the gradient through ℓ's own computation dropped; the mean of the
    absolute estimates is a magnitude that effects cancelling across paths cannot hide in.

    Args:
        model: the model.
        prep: `prepare(model, task)`.
        grad_drop: also run GradDrop (one more backward per layer).
        progress: a progress bar over GradDrop's layers.

    Returns:
        HeadScores "atp_star" with maps `effect` (primary: the saturation-fixed estimate, normalised), `q`, `k`, `v`
        (its terms), `atp` (plain AtP), `grad_drop` (the GradDrop magnitude, normalised by |gap|; NaN if not run) and
        `screen` = max(|effect|, grad_drop): rank by it to choose the heads to verify by exact patching.
    """
    start = time.perf_counter()
    n_layers, n_heads = model.n_layers, model.n_heads
    grads_a, grads_v = _pattern_value_grads(model, prep)
    terms = {c: torch.zeros(n_layers, n_heads, len(prep.end)) for c in CHANNELS}
    for layer in range(n_layers):
        clean, corr = prep.clean_run.records[layer], prep.corrupt_run.records[layer]
        a_clean = clean.pattern()  # [N, H, T, S]
        a_q = _pattern_with(clean, q=corr.q)
        a_k = _pattern_with(clean, k=corr.k)
        ga = grads_a[layer]  # [N, H, T, S]
        terms["q"][layer] = ((a_q - a_clean) * ga).sum((2, 3)).T
        terms["k"][layer] = ((a_k - a_clean) * ga).sum((2, 3)).T
        dv = (corr.v - clean.v).float()  # [N, G, S, D]
        per = n_heads // clean.v.shape[1]
        dv = dv.repeat_interleave(per, dim=1)  # [N, H, S, D]
        terms["v"][layer] = (dv * grads_v[layer]).sum((2, 3)).T
    delta = terms["q"] + terms["k"] + terms["v"]
    plain = _atp_from_grads(model, prep, _head_grads(model, prep))
    gd = torch.full((n_layers, n_heads), float("nan"))
    if grad_drop:
        acc = torch.zeros(n_layers, n_heads)
        for drop in tqdm(range(n_layers), desc="GradDrop", disable=not progress, leave=False):
            est = _atp_from_grads(model, prep, _head_grads(model, prep, drop_layer=drop)).mean(-1).abs()
            mine = torch.arange(n_layers)[:, None] == drop
            acc += torch.where(mine, plain.mean(-1).abs(), est)  # a node's own layer: its undropped estimate
        gd = acc / n_layers / abs(prep.gap)
    maps = {c: terms[c].mean(-1) / prep.gap for c in CHANNELS}
    maps["atp"] = plain.mean(-1) / prep.gap
    maps["grad_drop"] = gd
    # the screen AtP* is meant for: a head is a candidate for exact patching when either magnitude is large
    maps["screen"] = torch.maximum((delta.mean(-1) / prep.gap).abs(), gd.nan_to_num(0.0))
    scores = _scores(model, prep, "atp_star", None, params={"method": "atp*", "grad_drop": grad_drop},
                     seconds=time.perf_counter() - start, effect=delta.mean(-1) / prep.gap, extra=maps)
    scores.items["delta"] = delta
    return scores


def _pattern_with(record: Any, *, q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's patterns `[B, H, Q, S]` with its queries or keys replaced."""
    import dataclasses

    return dataclasses.replace(record, q=record.q if q is None else q, k=record.k if k is None else k).pattern()


def _pattern_value_grads(model: HeadModel, prep: Prepared) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """∂(Σ LD)/∂A `[N, H, T, S]` and ∂(Σ LD)/∂v `[N, H, S, D]` (per query head) of every layer at the clean point.

    Each head's output gets `A·v − stopgrad(A·v)` added (zero), with A and v leaves that require grad: their gradient is
    ∂LD/∂z through every path, while the heads' own outputs keep theirs."""
    grads_a, grads_v = {}, {}
    leaves_a, leaves_v = {}, {}
    edits = []
    for layer in range(model.n_layers):
        rec = prep.clean_run.records[layer]
        a = rec.pattern().detach().requires_grad_(True)  # [N, H, T, S]
        per = model.n_heads // rec.v.shape[1]
        v = rec.v.float().repeat_interleave(per, dim=1).detach().requires_grad_(True)  # [N, H, S, D]
        leaves_a[layer], leaves_v[layer] = a, v
        z = torch.matmul(a, v).transpose(1, 2)  # [N, T, H, D]
        zero = z - z.detach()  # 0, with the gradient to the pattern and value leaves
        edits += [Add(HeadRef(layer, h), delta=zero[:, :, h]) for h in range(model.n_heads)]
    with torch.enable_grad(), edit(model, edits):
        hidden = model.hf.base_model(input_ids=prep.clean.input_ids, attention_mask=prep.clean.attention_mask,
                                     use_cache=False).last_hidden_state
        _ld(prep.inputs.unembed(hidden, prep.end, prep.tokens)).sum().backward()
    for layer in range(model.n_layers):
        grads_a[layer], grads_v[layer] = leaves_a[layer].grad, leaves_v[layer].grad
    return grads_a, grads_v


def agreement(reference: HeadScores, estimate: HeadScores, *, k: int = 10, map: str = "effect") -> dict[str, float]:
    """How well an estimate (AtP, AtP*) recovers exact patching.

    Args:
        reference: exact patching's HeadScores (its `effect` map).
        estimate: the estimate's HeadScores.
        k: the number of top heads (by |effect|) compared.
        map: the estimate's map to compare (e.g. "effect", "screen").

    Returns:
        {"spearman_abs": rank correlation of |effect|, "spearman", f"recall_top{k}": share of the reference's top-k
        heads in the estimate's top k, f"recall_top{k}_in_top{2k}" / f"..._in_top{3k}", "worst_rank_of_top": the
        worst rank the estimate gives one of them (how many heads a screen must verify exactly to miss none),
        f"sign_agree_top{k}": sign agreement on those k, "missed": the top-k heads it misses}.
    """
    from headlab.analyses.metrics import spearman

    ref = reference.maps["effect"].flatten()
    est = estimate.maps[map].flatten()
    ok = ~(ref.isnan() | est.isnan())
    top_ref = set(ref.abs().nan_to_num(-1).topk(k).indices.tolist())
    top_est = set(est.abs().nan_to_num(-1).topk(k).indices.tolist())
    n_heads = reference.maps["effect"].shape[1]
    top = sorted(top_ref)
    order = est.abs().nan_to_num(-1).argsort(descending=True).tolist()
    rank = {i: r for r, i in enumerate(order)}
    return {
        "spearman_abs": float(spearman(ref[ok].abs(), est[ok].abs())),
        "spearman": float(spearman(ref[ok], est[ok])),
        f"recall_top{k}": len(top_ref & top_est) / k,
        f"sign_agree_top{k}": float(sum(bool(torch.sign(ref[i]) == torch.sign(est[i])) for i in top) / k),
        "missed": [str(HeadRef(i // n_heads, i % n_heads)) for i in sorted(top_ref - top_est)],
        f"recall_top{k}_in_top{2 * k}": sum(rank[i] < 2 * k for i in top_ref) / k,
        f"recall_top{k}_in_top{3 * k}": sum(rank[i] < 3 * k for i in top_ref) / k,
        "worst_rank_of_top": max(rank[i] for i in top_ref) + 1,
    }
