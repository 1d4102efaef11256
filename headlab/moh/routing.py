"""Routing analytics of mixture-of-head attention: which heads each token picks, how balanced, how sure, and why.

`trace(model, moh, prompts)` runs a MoH edit (or a model with its own MoH layers) over prompts and keeps, for every
real token, the gates `[L, H]` and the routed heads' scores; `MoHRouting` holds them with the per-head maps and
answers the questions (it saves and reloads as a `HeadScores` folder):

- `frequency`: the share of tokens for which a head is on (shared heads: 1);
- `load_balance()`: MoH's L_b = Σ_i P_i f_i over the routed heads (P_i the mean routing probability, f_i the share of
  tokens choosing head i; a perfectly balanced router gives k / h_r) and the coefficient of variation of f;
- `entropy()`: the mean entropy of the routing distribution softmax(scores) per token, in nats and as a share of
  log h_r;
- `by_type()`: per token type (first token, punctuation, number, whitespace, function word, content word, repeated
  token), each head's frequency and its lift over the head's overall frequency;
- `relate(scores)`: Spearman correlation over the routed heads between routing frequency and other per-head scores
  (induction, retrieval, sinks);
- `costs()`: the share of (token, query head) pairs computed and, GQA-aware, of (token, KV group) pairs whose cache
  must be read (a group is skipped only when all of its query heads are off).
"""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from headlab.analyses.metrics import spearman
from headlab.edits import edit
from headlab.edits.moh import MoH
from headlab.errors import HeadlabError
from headlab.heads import HeadRef
from headlab.models.head_model import HeadModel
from headlab.results import HeadScores, run_meta

#: token types, in the order of `flags` columns (a token may have several)
TOKEN_TYPES: tuple[str, ...] = ("first", "punctuation", "number", "whitespace", "function_word", "content_word",
                                "repeated")

FUNCTION_WORDS = frozenset("""a an the and or but nor so yet for of in on at to from by with as into onto upon about
over under than then that this these those there here which who whom whose what when where why how i me my mine we
us our you your he him his she her it its they them their is am are was were be been being have has had do does did
will would shall should can could may might must not no if unto thee thou thy ye hath shall""".split())


def token_flags(strings: list[str], ids: list[int]) -> torch.Tensor:
    """Bool `[T, len(TOKEN_TYPES)]`: the types of each token of one sequence (from its display strings and ids).

    Args:
        strings: the T tokens' display strings.
        ids: their token ids (a repeated token is one whose id came before).

    Returns:
        Bool `[T, 7]`, columns in `TOKEN_TYPES` order.
    """
    flags = torch.zeros(len(strings), len(TOKEN_TYPES), dtype=torch.bool)
    seen: set[int] = set()
    for t, (s, i) in enumerate(zip(strings, ids)):
        word = s.strip()
        flags[t, 0] = t == 0
        flags[t, 1] = bool(word) and all(c in string.punctuation or not c.isalnum() for c in word) \
            and any(c in string.punctuation for c in word)
        flags[t, 2] = bool(word) and word.isdigit()
        flags[t, 3] = not word
        flags[t, 4] = word.lower() in FUNCTION_WORDS
        flags[t, 5] = word.isalpha() and word.lower() not in FUNCTION_WORDS
        flags[t, 6] = i in seen
        seen.add(i)
    return flags


@dataclass
class MoHRouting:
    """The routing of every real token of some prompts: gates, scores, token types, and the maps derived from them.

    Attributes:
        scores: a HeadScores "moh_routing": maps `frequency` [L, H] (primary), `mean_prob` (routed heads' mean
            routing probability; NaN for shared heads and unrouted layers) and `lift_<type>` for each token type;
            items `gates` uint8 `[N, L, H]`, `router_scores` float32 `[N, L, h_r]` (absent when the router's scores
            are not known, e.g. a model's own MoH layers), `token_ids`, `positions`, `sequence` `[N]`, `flags` bool
            `[N, len(TOKEN_TYPES)]`; params: shared, k, routed layers, n_kv_heads, token strings' source.
    """

    scores: HeadScores

    # -- access ---------------------------------------------------------------------------------------------------

    @property
    def gates(self) -> torch.Tensor:
        """Bool `[N, L, H]`: which heads were on for each real token."""
        return self.scores.items["gates"].bool()

    @property
    def router_scores(self) -> torch.Tensor | None:
        """float32 `[N, L', h_r]` router scores of the routed layers (None when not known)."""
        return self.scores.items.get("router_scores")

    @property
    def flags(self) -> torch.Tensor:
        """Bool `[N, len(TOKEN_TYPES)]`: each token's types."""
        return self.scores.items["flags"].bool()

    @property
    def frequency(self) -> torch.Tensor:
        """`[L, H]`: the share of tokens for which each head is on."""
        return self.scores.maps["frequency"]

    @property
    def shared(self) -> int:
        """Shared (always-on) heads per routed layer."""
        return int(self.scores.params["shared"])

    @property
    def k(self) -> int:
        """Routed heads on per token."""
        return int(self.scores.params["k"])

    @property
    def layers(self) -> list[int]:
        """The routed layers."""
        return list(self.scores.params["layers"])

    @property
    def n_routed(self) -> int:
        """h_r, routed heads per layer."""
        return self.gates.shape[-1] - self.shared

    def probs(self) -> torch.Tensor | None:
        """softmax(router scores) `[N, L', h_r]` over the routed heads of the routed layers (None without scores).

        Returns:
            float32 `[N, L', h_r]`, or None.
        """
        s = self.router_scores
        return None if s is None else torch.softmax(s.float(), dim=-1)

    # -- statistics -----------------------------------------------------------------------------------------------

    def load_balance(self) -> dict[str, Any]:
        """MoH's load-balance term and the spread of the routed heads' frequencies, per routed layer.

        Returns:
            {"layers", "L_b": per layer Σ_i P_i f_i (NaN without router scores), "balanced_L_b": k / h_r, "cv": per
            layer the coefficient of variation of the frequencies f_i (0 = every routed head chosen equally often),
            "mean_L_b", "mean_cv"}.
        """
        g = self.gates[:, self.layers, self.shared:].float()  # [N, L', h_r]
        f = g.mean(0)  # [L', h_r]
        p = self.probs()
        lb = (p.mean(0) * f).sum(-1) if p is not None else torch.full((len(self.layers),), float("nan"))
        cv = f.std(-1, unbiased=False) / f.mean(-1).clamp_min(1e-12)
        return {"layers": self.layers, "L_b": lb.tolist(), "balanced_L_b": self.k / self.n_routed, "cv": cv.tolist(),
                "mean_L_b": float(lb.mean()), "mean_cv": float(cv.mean())}

    def entropy(self) -> dict[str, Any]:
        """How sure the router is per token, and how spread its choices are overall, per routed layer.

        Returns:
            {"layers", "token_entropy": mean per-token entropy (nats) of softmax(router scores) (NaN without
            scores), "token_entropy_share": that over log h_r, "usage_entropy": entropy of the frequency
            distribution f / Σ f, and the means "mean_token_entropy", "mean_token_entropy_share",
            "mean_usage_entropy_share"}.
        """
        g = self.gates[:, self.layers, self.shared:].float()
        f = g.mean(0)
        fn = f / f.sum(-1, keepdim=True).clamp_min(1e-12)
        usage = -(fn * fn.clamp_min(1e-12).log()).sum(-1)
        p = self.probs()
        if p is not None:
            token = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(0)
        else:
            token = torch.full((len(self.layers),), float("nan"))
        top = math.log(self.n_routed) if self.n_routed > 1 else 1.0
        return {"layers": self.layers, "token_entropy": token.tolist(), "token_entropy_share": (token / top).tolist(),
                "usage_entropy": usage.tolist(), "mean_token_entropy": float(token.mean()),
                "mean_token_entropy_share": float((token / top).mean()), "mean_usage_entropy_share":
                float((usage / top).mean())}

    def by_type(self, *, top: int = 5, min_tokens: int = 5) -> dict[str, Any]:
        """For each token type: the routed heads its tokens pick more often than tokens overall.

        Heads are ranked by the excess (frequency among tokens of the type − overall frequency, so a rarely used head
        is not ranked first on a large ratio of small shares).

        Args:
            top: heads listed per type.
            min_tokens: types with fewer tokens list none.

        Returns:
            {type: {"tokens": count, "top": [(head "L3H1", frequency in the type, lift = frequency / overall)]}}.
        """
        out: dict[str, Any] = {}
        g = self.gates.float()
        overall = g.mean(0)
        routed = torch.zeros_like(overall, dtype=torch.bool)
        routed[self.layers, self.shared:] = True
        n_heads = overall.shape[1]
        for j, name in enumerate(TOKEN_TYPES):
            rows = self.flags[:, j]
            n = int(rows.sum())
            if n < min_tokens:
                out[name] = {"tokens": n, "top": []}
                continue
            freq = g[rows].mean(0)
            excess = torch.where(routed, freq - overall, torch.nan).flatten().nan_to_num(float("-inf"))
            lift = (freq / overall.clamp_min(1e-12)).flatten()
            idx = excess.topk(min(top, int(routed.sum()))).indices
            out[name] = {"tokens": n, "top": [(str(HeadRef(int(i) // n_heads, int(i) % n_heads)),
                                               float(freq.flatten()[i]), float(lift[i])) for i in idx]}
        return out

    def relate(self, scores: dict[str, torch.Tensor]) -> dict[str, float]:
        """Spearman correlation, over the routed heads of the routed layers, between routing frequency and other maps.

        Args:
            scores: {name: per-head map `[L, H]`} (e.g. induction, retrieval, sink scores) of the same model.

        Returns:
            {name: correlation} (NaN where fewer than three finite values or a constant map).

        Raises:
            HeadlabError: a map whose shape is not the routing's `[L, H]`.
        """
        mask = torch.zeros_like(self.frequency, dtype=torch.bool)
        mask[self.layers, self.shared:] = True
        f = self.frequency[mask]
        out = {}
        for name, m in scores.items():
            m = torch.as_tensor(m, dtype=torch.float32)
            if m.shape != self.frequency.shape:
                raise HeadlabError(f"score map {name!r} has shape {tuple(m.shape)}, the routing "
                                   f"{tuple(self.frequency.shape)} ([L, H] of the same model)")
            vals = m[mask]
            keep = torch.isfinite(vals)
            out[name] = float(spearman(f[keep], vals[keep])) if int(keep.sum()) > 2 else float("nan")
        return out

    def costs(self) -> dict[str, float]:
        """Shares of work done over the routed layers.

        A KV group is skipped for a token only when all its query heads are off.

        Returns:
            {"query_heads_on": share of (token, query head) pairs on, "kv_groups_read": share of (token, KV group)
            pairs whose cache is read, "routed_heads_on": share of routed (token, head) pairs on}.
        """
        g = self.gates[:, self.layers]  # [N, L', H]
        n_kv = int(self.scores.params["n_kv_heads"])
        per = g.shape[-1] // n_kv
        groups = g.reshape(*g.shape[:-1], n_kv, per).any(-1)
        return {"query_heads_on": float(g.float().mean()), "kv_groups_read": float(groups.float().mean()),
                "routed_heads_on": float(g[..., self.shared:].float().mean()) if self.n_routed else 1.0}

    def summary(self) -> dict[str, Any]:
        """The headline numbers (for notes and notebooks).

        Returns:
            {"tokens", "shared", "k", "n_routed", "mean_L_b", "balanced_L_b", "mean_cv", "mean_token_entropy_share",
            "mean_usage_entropy_share", the `costs()`, "by_type": each type's top three heads}.
        """
        lb, ent = self.load_balance(), self.entropy()
        return {"tokens": int(self.gates.shape[0]), "shared": self.shared, "k": self.k, "n_routed": self.n_routed,
                "mean_L_b": lb["mean_L_b"], "balanced_L_b": lb["balanced_L_b"], "mean_cv": lb["mean_cv"],
                "mean_token_entropy_share": ent["mean_token_entropy_share"],
                "mean_usage_entropy_share": ent["mean_usage_entropy_share"], **self.costs(),
                "by_type": {k: v["top"][:3] for k, v in self.by_type().items()}}

    # -- figures and persistence ------------------------------------------------------------------------------------

    def figure(self, map: str = "frequency"):
        """A layer × head heatmap of `frequency`, `mean_prob` or `lift_<type>`.

        Args:
            map: the map's name.

        Returns:
            A plotly Figure.
        """
        return self.scores.figure(map)

    def token_figure(self, sequence: int = 0, layer: int | None = None, strings: list[str] | None = None):
        """Per-token routing of one sequence at one layer (tokens × heads, 1 = on).

        Args:
            sequence: the sequence's index among the traced prompts.
            layer: the layer (default: the first routed one).
            strings: the tokens' display strings (default: `#id`).

        Returns:
            A plotly Figure (`headlab.viz.moh.token_routing`).
        """
        from headlab.viz.moh import token_routing

        layer = self.layers[0] if layer is None else layer
        rows = self.scores.items["sequence"] == sequence
        gates = self.gates[rows, layer].float()
        ids = self.scores.items["token_ids"][rows].tolist()
        return token_routing(gates, strings or [f"#{i}" for i in ids], shared=self.shared,
                             title=f"routing at layer {layer}, sequence {sequence}")

    def save(self, folder: str | Path) -> Path:
        """Save as a HeadScores folder.

        Args:
            folder: the folder (created if needed).

        Returns:
            The folder, as a Path.
        """
        return self.scores.save(folder)

    @classmethod
    def load(cls, folder: str | Path) -> "MoHRouting":
        """A routing saved by `save`.

        Args:
            folder: the HeadScores folder.

        Returns:
            The MoHRouting.

        Raises:
            HeadlabError: a folder holding another analysis.
            ResultError: a missing or unreadable folder.
        """
        scores = HeadScores.load(folder)
        if scores.analysis != "moh_routing":
            raise HeadlabError(f"{folder} holds a {scores.analysis!r} result, not a MoH routing")
        return cls(scores)


def _texts(model: HeadModel, prompts: Any) -> list[Any]:
    if isinstance(prompts, (str, torch.Tensor)):
        return [prompts]
    return list(prompts)


def trace(model: HeadModel, moh: MoH | None, prompts: Iterable[Any] | Any, *, batch: int = 8,
          progress: bool = False) -> MoHRouting:
    """Route `prompts` (texts, or token id rows) and keep every real token's gates and router scores.

    Args:
        model: the HeadModel.
        moh: the MoH edit to trace; None reads the gates a model's own MoH layers record (`LayerRecord.gates`; their
            router scores are not seen, so probabilities, L_b and entropy are NaN there).
        prompts: a text or token-id tensor, or a list of them.
        batch: prompts per forward.
        progress: show a progress bar.

    Returns:
        The MoHRouting of every real (unpadded) token.

    Raises:
        HeadlabError: no prompts, or (moh=None) a model without MoH layers.
        EditError: a MoH edit that does not fit the model.
    """
    prompts = _texts(model, prompts)
    if not prompts:
        raise HeadlabError("trace needs at least one prompt")
    gates_all, scores_all, ids_all, pos_all, seq_all, flags_all = [], [], [], [], [], []
    n_seq = 0
    if moh is not None:
        shared, k, layers = moh.n_shared(model), moh.k(model), moh.routed_layers(model)
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    for chunk in tqdm(chunks, desc="routing", disable=not progress, leave=False):
        b = model.encode(chunk if not isinstance(chunk[0], torch.Tensor) else torch.stack(chunk))
        layer_gates: dict[int, torch.Tensor] = {}
        layer_scores: dict[int, torch.Tensor] = {}
        if moh is not None:
            def collect(layer: int, s: torch.Tensor, g: torch.Tensor) -> None:
                layer_scores[layer] = s.detach().float()
                layer_gates[layer] = g.detach()

            with edit(model, dataclasses.replace(moh, on_route=collect)), torch.no_grad():
                model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
        else:
            with model.capturing() as cap, torch.no_grad():
                model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
            for layer, rec in cap.records.items():
                if rec.gates is not None:
                    layer_gates[layer] = rec.gates
            if not layer_gates:
                raise HeadlabError(f"{model.name} has no MoH layers: give a MoH edit to trace")
        B, T = b.input_ids.shape
        full = torch.ones(B, T, model.n_layers, model.n_heads)
        for layer, g in layer_gates.items():
            full[:, :, layer] = g.float()
        real = b.attention_mask.bool()
        gates_all.append((full[real] != 0).to(torch.uint8))
        if layer_scores:
            sc = torch.stack([layer_scores[layer] for layer in sorted(layer_scores)], dim=2)  # [B, T, L', h_r]
            scores_all.append(sc[real])
        for row in range(B):
            ids = b.input_ids[row][real[row]].tolist()
            ids_all.append(torch.tensor(ids))
            pos_all.append(torch.arange(len(ids)))
            seq_all.append(torch.full((len(ids),), n_seq))
            flags_all.append(token_flags(model.token_strings(ids), ids))
            n_seq += 1
    if moh is None:
        layers = sorted(layer_gates)
        shared, k = _own_shared(model), _own_k(model)
    gates = torch.cat(gates_all)
    items = {"gates": gates, "token_ids": torch.cat(ids_all), "positions": torch.cat(pos_all),
             "sequence": torch.cat(seq_all), "flags": torch.cat(flags_all).to(torch.uint8)}
    if scores_all:
        items["router_scores"] = torch.cat(scores_all)
    maps = _maps(gates.bool(), items.get("router_scores"), torch.cat(flags_all), layers, shared)
    params = {"shared": shared, "k": k, "layers": layers, "n_kv_heads": model.n_kv_heads,
              "router": "own MoH layers" if moh is None else type(moh.router).__name__ if moh.router is not None
              else "QueryNormRouter", "prompts": len(prompts)}
    return MoHRouting(HeadScores(analysis="moh_routing", model=model.name, maps=maps, primary="frequency",
                                 params=params, meta=run_meta(model), items=items))


def _own_shared(model: HeadModel) -> int:
    cfg = model.hf.config
    shared = getattr(cfg, "moh_shared_heads", None)
    if not shared:
        raise HeadlabError(f"{model.name} has no MoH layers (config.moh_shared_heads): give a MoH edit to trace")
    return int(shared)


def _own_k(model: HeadModel) -> int:
    return int(getattr(model.hf.config, "moh_active_heads"))


def _maps(gates: torch.Tensor, scores: torch.Tensor | None, flags: torch.Tensor, layers: list[int],
          shared: int) -> dict[str, torch.Tensor]:
    g = gates.float()
    freq = g.mean(0)
    mean_prob = torch.full_like(freq, float("nan"))
    if scores is not None:
        mean_prob[layers, shared:] = torch.softmax(scores.float(), -1).mean(0)
    maps = {"frequency": freq, "mean_prob": mean_prob}
    for j, name in enumerate(TOKEN_TYPES):
        rows = flags[:, j]
        if int(rows.sum()) == 0:
            maps[f"lift_{name}"] = torch.full_like(freq, float("nan"))
        else:
            maps[f"lift_{name}"] = g[rows].mean(0) / freq.clamp_min(1e-12)
    return maps
