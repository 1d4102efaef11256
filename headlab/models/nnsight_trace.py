"""Heads through nnsight traces: per-head q/k patterns, z edits and patching where headlab's seam cannot go.

`hl.load(nnsight_model)` wraps the HF model under an nnsight model and installs headlab's seam in it, which needs
the model in this process. On NDIF (nnsight's remote execution) the model runs on a server where nothing of
headlab is installed, so this module expresses what headlab needs as nnsight traces, which run the same locally
(`remote=False`), as nnsight's serialise-and-run dry run (`remote="local"`), or on NDIF (`remote=True`):

* q and k: the trace saves each layer's `q_proj` / `k_proj` outputs and the `position_embeddings` (cos, sin) the
  decoder passed to that attention module; here they are split into heads and rotated with the model family's own
  `apply_rotary_pos_emb` (as the HF attention does), and each layer becomes a headlab `LayerRecord` (post-RoPE q
  `[B, H, Q, D]`, k / v `[B, G, S, D]` with GQA grouping, the visible-key mask: causal, padding, sliding window),
  whose `pattern()` is headlab's own softmax(q·k·scale) `[B, H, Q, S]`.
* z: the input of `o_proj` (`[B, T, H·D]`, head h's slice is `[h·D, (h+1)·D)`): edits set a head's slice inside
  the trace (`ZEdit`: scale it, 0 = zero ablation, or replace it by values from another run at chosen positions,
  i.e. activation patching); `with_z=True` saves it (after the edits) as `record.z` `[B, Q, H, D]`.

Only the saved tensors come back from a remote run (q, k, v and z of the traced layers, the cos/sin, the logits):
patterns are computed here, so a remote run sends O(L·T·(H+2G)·D) numbers, not O(L·H·T²).
Families: Llama, Mistral, Qwen2 (separate q/k/v/o projections and rotary position embeddings).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from headlab.capture import LayerRecord, fit_positions
from headlab.errors import EditError, PromptError, UnsupportedModelError
from headlab.heads import HeadRef, as_heads, heads_per_group
from headlab.models.arch import ARCHS, find_attention_modules
from headlab.run import Batch

#: Families whose heads the trace path reaches (separate projections, rotary embeddings from the decoder).
TRACE_FAMILIES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ZEdit:
    """An edit of one head's slice of the output-projection input (its z), applied inside an nnsight trace.

    Attributes:
        head: the head (a HeadRef, (layer, head) pair or "L3H1").
        scale: multiplies the head's z (0: zero ablation; 1 with a `value`: plain replacement).
        value: replacement z `[B|1, T, D]` (e.g. `TraceRun.z(head)` of another prompt): activation patching.
        positions: bool `[B|1, T]` where `value` applies (everywhere when None); a list of positions is the same
            in every prompt.
    """

    head: HeadRef
    scale: float = 1.0
    value: torch.Tensor | None = None
    positions: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", as_heads([self.head])[0])
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale != self.scale \
                or self.scale in (float("inf"), float("-inf")):
            raise EditError(f"ZEdit({self.head}): scale must be a finite number, got {self.scale!r}")
        if self.value is not None and (not isinstance(self.value, torch.Tensor) or self.value.dim() != 3):
            shape = tuple(self.value.shape) if isinstance(self.value, torch.Tensor) else type(self.value).__name__
            raise EditError(f"ZEdit({self.head}): value must be a [B, T, D] tensor, got {shape}")
        if self.positions is not None and self.value is None:
            raise EditError(f"ZEdit({self.head}): positions apply to a replacement value; give value=")
        if self.positions is not None and not (isinstance(self.positions, torch.Tensor)
                                               and self.positions.dtype == torch.bool):
            try:
                idx = torch.as_tensor(self.positions, dtype=torch.long).flatten()
            except (TypeError, ValueError, RuntimeError):
                raise EditError(f"ZEdit({self.head}): positions must be a bool [B, T] mask or a list of positions, "
                                f"got {self.positions!r}") from None
            mask = torch.zeros(1, int(idx.max()) + 1 if idx.numel() else 0, dtype=torch.bool)
            mask[0, idx] = True
            object.__setattr__(self, "positions", mask)
        elif self.positions is not None and self.positions.dim() == 1:
            object.__setattr__(self, "positions", self.positions[None])


def z_edits(edits: Iterable[Any]) -> list[ZEdit]:
    """headlab edits that act on z, as ZEdits: `Ablate(how="zero")`, `Scale`, `Patch(z=...)`; ZEdits pass through.

    Args:
        edits: ZEdits and headlab edit objects (read by their fields; nothing of `headlab.edits` is imported).

    Returns:
        The list of ZEdits.

    Raises:
        EditError: an edit a trace cannot express on z (mean or uniform ablation, q/k/v patches, others).
    """
    out: list[ZEdit] = []
    for edit in edits:
        kind = type(edit).__name__
        if isinstance(edit, ZEdit):
            out.append(edit)
        elif kind == "Ablate" and getattr(edit, "how", None) == "zero":
            out.append(ZEdit(edit.head, scale=0.0))
        elif kind == "Scale" and isinstance(getattr(edit, "factor", None), (int, float, torch.Tensor)):
            factor = edit.factor
            out.append(ZEdit(edit.head, scale=float(factor.item() if isinstance(factor, torch.Tensor) else factor)))
        elif kind == "Patch" and getattr(edit, "targets", None) == ("z",):
            out.append(ZEdit(edit.head, value=edit.z, positions=edit.positions))
        else:
            what = f"Ablate(how={edit.how!r})" if kind == "Ablate" else kind
            raise EditError(f"the nnsight trace path sets heads' z only: zero ablation, Scale, Patch(z=) or ZEdit; "
                            f"{what} is not one of them")
    return out


@dataclass
class TraceRun:
    """One traced forward: per-layer records made from the saved projections, and the logits.

    Attributes:
        batch: the token batch (right-padded).
        records: layer -> LayerRecord (post-RoPE q `[B, H, Q, D]`, k / v `[B, G, S, D]`, the visible mask
            `[B, 1, Q, S]`, scale; z `[B, Q, H, D]` with `with_z`).
        logits: `[B, T, V]`.
        remote: how the trace ran (False, "local" or True).
    """

    batch: Batch
    records: dict[int, LayerRecord]
    logits: torch.Tensor
    remote: bool | str = False
    _heads: int = field(default=0, repr=False)

    def _record(self, layer: int) -> LayerRecord:
        if layer not in self.records:
            raise KeyError(f"layer {layer} was not traced; traced: {sorted(self.records)}")
        return self.records[layer]

    def patterns(self, layer: int) -> torch.Tensor:
        """Float32 patterns `[B, H, Q, S]` of every head of a traced layer (headlab's softmax over visible keys)."""
        return self._record(layer).pattern()

    def pattern(self, head: Any) -> torch.Tensor:
        """Float32 pattern `[B, Q, S]` of one head."""
        ref = as_heads([head])[0]
        return self._record(ref.layer).pattern([ref.head])[:, 0]

    def z(self, head: Any) -> torch.Tensor:
        """One head's output z `[B, T, D]` (its slice of the output-projection input; needs `with_z=True`)."""
        ref = as_heads([head])[0]
        record = self._record(ref.layer)
        if record.z is None:
            raise KeyError(f"z of layer {ref.layer} was not saved: trace with with_z=True")
        return record.z[:, :, ref.head]


class NNsightHeads:
    """The heads of an nnsight model reached through traces (no seam): patterns, z edits, activation patching.

    Args:
        lm: an nnsight `TransformersModel` (or the deprecated `LanguageModel`) of a Llama, Mistral or Qwen2 model.
            For NDIF, build it from the hub repo id the server hosts (`TransformersModel("meta-llama/Llama-3.1-8B",
            task="text-generation")`): locally it stays a weightless skeleton.
        remote: False (run here), "local" (nnsight serialises the trace and runs it in-process as a server would:
            checks that everything the trace uses ships) or True (NDIF; needs the network and an API key).

    Raises:
        UnsupportedModelError: not an nnsight model, or a family the trace path does not cover.
    """

    def __init__(self, lm: Any, *, remote: bool | str = False) -> None:
        if type(lm).__module__.split(".")[0] != "nnsight" or not hasattr(lm, "_module"):
            raise UnsupportedModelError(f"NNsightHeads takes an nnsight model (TransformersModel); got "
                                        f"{type(lm).__module__}.{type(lm).__name__} (use hl.load for HF models)")
        config = getattr(lm._module, "config", None)
        family = getattr(config, "model_type", None)
        if family not in TRACE_FAMILIES:
            raise UnsupportedModelError(f"the nnsight trace path covers {', '.join(TRACE_FAMILIES)}; this model's "
                                        f"model_type is {family!r}")
        self.lm, self.remote, self.config = lm, remote, config
        found = find_attention_modules(lm._module, ARCHS[family])
        self._names = [name for name, _ in found]
        first = found[0][1]
        self.n_layers = len(found)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scale = float(getattr(first, "scaling", self.head_dim ** -0.5))
        # Qwen2 keeps its window on each module (None on full-attention layers); Mistral only in its config
        self._windows = [module.sliding_window if hasattr(module, "sliding_window")
                         else getattr(config, "sliding_window", None) for _, module in found]
        self._rotate = getattr(sys.modules[type(first).__module__], "apply_rotary_pos_emb", None)
        if self._rotate is None:
            raise UnsupportedModelError(f"{type(first).__module__} has no apply_rotary_pos_emb")
        self.vocab_size = int(config.vocab_size)

    def __repr__(self) -> str:
        return (f"NNsightHeads({self.config.model_type}: {self.n_layers} layers × {self.n_heads} heads, "
                f"{self.n_kv_heads} KV groups, remote={self.remote!r})")

    # inputs

    def encode(self, prompt: Any) -> Batch:
        """A right-padded Batch (on the CPU) from text (the nnsight model's tokenizer), token ids or a Batch.

        Raises:
            PromptError: empty, non-integer or out-of-vocabulary ids, or text without a tokenizer.
        """
        if isinstance(prompt, Batch):
            ids, mask = prompt.input_ids.cpu(), prompt.attention_mask.cpu()
        elif isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                         and all(isinstance(p, str) for p in prompt)):
            tok = getattr(self.lm, "tokenizer", None)
            if tok is None:
                raise PromptError("this nnsight model has no tokenizer: pass token ids")
            rows = tok([prompt] if isinstance(prompt, str) else list(prompt))["input_ids"]
            ids, mask = _pad([torch.as_tensor(r, dtype=torch.long) for r in rows], self.pad_id)
        else:
            if isinstance(prompt, torch.Tensor):
                if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                    raise PromptError(f"token ids must be integers, got a {prompt.dtype} tensor")
                rows = list(prompt[None] if prompt.dim() == 1 else prompt)
            elif isinstance(prompt, (list, tuple)) and prompt:
                rows = [prompt] if all(isinstance(x, int) for x in prompt) else list(prompt)
            else:
                raise PromptError(f"cannot read a prompt from {prompt!r}: text, token ids or a Batch")
            try:
                ids, mask = _pad([torch.as_tensor(r, dtype=torch.long) for r in rows], self.pad_id)
            except (TypeError, ValueError, RuntimeError):
                raise PromptError("token ids must be ints (a [T] or [B, T] list or LongTensor)") from None
        if ids.numel() == 0 or bool((mask.sum(-1) == 0).any()):
            raise PromptError("empty prompt: every item needs at least one token")
        real = ids[mask.bool()]
        if int(real.min()) < 0 or int(real.max()) >= self.vocab_size:
            raise PromptError(f"token ids must lie in 0..{self.vocab_size - 1}; got {int(real.min())}..{int(real.max())}")
        return Batch(ids, mask)

    @property
    def pad_id(self) -> int:
        """The id written at padded positions (as `HeadModel.pad_id`: the tokenizer's pad, the config's pad or EOS, else
        0); padded keys are masked, so it only shows in the rows of padded queries."""
        tok = getattr(self.lm, "tokenizer", None)
        for pad in (getattr(tok, "pad_token_id", None), getattr(self.config, "pad_token_id", None),
                    getattr(self.config, "eos_token_id", None)):
            pad = pad[0] if isinstance(pad, list) and pad else pad
            if isinstance(pad, int) and 0 <= pad < self.vocab_size:
                return pad
        return 0

    # the trace

    def run(self, prompt: Any, *, layers: Iterable[int] | None = None, heads: Iterable[Any] | None = None,
            with_z: bool = False, edits: Sequence[Any] = ()) -> TraceRun:
        """One nnsight trace: save q/k/v (and z) of the chosen layers, apply z edits, return records and logits.

        Args:
            prompt: text, token ids or a Batch.
            layers: layers to record (all when neither `layers` nor `heads` is given).
            heads: heads whose layers to record.
            with_z: also save each recorded layer's z (after the edits) as `record.z` `[B, Q, H, D]`.
            edits: ZEdits or headlab's `Ablate` (zero) / `Scale` / `Patch(z=)` (see `z_edits`).

        Returns:
            A TraceRun (`patterns(layer)` `[B, H, Q, S]`, `pattern(head)`, `z(head)`, `logits`).

        Raises:
            HeadIndexError: a layer or head out of range.
            EditError: an edit a trace cannot express, or a value that does not fit the prompt.
            PromptError: a bad prompt.
        """
        from headlab.errors import HeadIndexError

        wanted = set(layers or []) | {h.layer for h in as_heads(heads or [])}
        if layers is None and heads is None:
            wanted = set(range(self.n_layers))
        edit_list = z_edits(edits)
        for ref in [e.head for e in edit_list] + [HeadRef(l, 0) for l in wanted]:
            if not (isinstance(ref.layer, int) and 0 <= ref.layer < self.n_layers and 0 <= ref.head < self.n_heads):
                raise HeadIndexError(f"{ref} is out of range: {self.n_layers} layers × {self.n_heads} heads")
        batch = self.encode(prompt)
        n_b, n_t = batch.input_ids.shape
        D = self.head_dim
        per_layer: dict[int, list[tuple[slice, float, torch.Tensor | None, torch.Tensor | None]]] = {}
        for e in edit_list:
            value = where = None
            if e.value is not None:
                if e.value.shape[0] not in (1, n_b) or e.value.shape[1:] != (n_t, D):
                    raise EditError(f"ZEdit({e.head}): value of shape {tuple(e.value.shape)} does not fit this "
                                    f"prompt's z [{n_b}, {n_t}, {D}]")
                value = e.value.detach().to(torch.float32)
                if e.positions is not None:
                    where = fit_positions(e.positions, n_b, n_t, "queries")
            per_layer.setdefault(e.head.layer, []).append((slice(e.head.head * D, (e.head.head + 1) * D), float(e.scale),
                                                           value, where))
        order = sorted(wanted | set(per_layer))
        saved = _trace(self.lm, self._envoys(order), order, wanted, with_z, per_layer,
                       {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, self.remote)
        records = {layer: self._record(layer, saved[layer], batch, with_z) for layer in sorted(wanted)}
        return TraceRun(batch=batch, records=records, logits=saved["logits"], remote=self.remote,
                        _heads=self.n_heads)

    def _envoys(self, layers: list[int]) -> list[Any]:
        out = []
        for layer in layers:
            node = self.lm
            for part in self._names[layer].split("."):
                node = node[int(part)] if part.isdigit() else getattr(node, part)
            out.append(node)
        return out

    def _record(self, layer: int, saved: dict, batch: Batch, with_z: bool) -> LayerRecord:
        """A LayerRecord from one layer's saved projection outputs, rotated as the HF attention rotates them."""
        n_b, n_t = batch.input_ids.shape
        q = saved["q"].view(n_b, n_t, self.n_heads, self.head_dim).transpose(1, 2)
        k = saved["k"].view(n_b, n_t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = saved["v"].view(n_b, n_t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = saved["position_embeddings"]
        q, k = self._rotate(q, k, cos, sin)
        heads_per_group(self.n_heads, self.n_kv_heads)  # GQA: H a multiple of G (checked)
        keys = batch.attention_mask.bool().to(q.device)
        rows = torch.arange(n_t, device=q.device)
        visible = rows[None, :] <= rows[:, None]
        window = self._windows[layer]
        if window is not None:
            visible = visible & (rows[:, None] - rows[None, :] < int(window))
        mask = (visible[None] & keys[:, None, :])[:, None]  # [B, 1, Q, S]
        z = saved["z"].view(n_b, n_t, self.n_heads, self.head_dim) if with_z else None
        return LayerRecord(layer=layer, q=q, k=k, v=v, mask=mask, causal=True, scale=self.scale, z=z)


def _trace(lm: Any, envoys: list[Any], order: list[int], wanted: set[int], with_z: bool, edits: dict,
           inputs: dict, remote: bool | str) -> dict:
    """The nnsight trace itself: modules are visited in execution order (nnsight 0.8 requires it); only plain
    tensors, ints and dicts are used, so the block serialises for a remote run."""
    import nnsight

    out: dict = {}
    with torch.no_grad(), lm.trace(inputs, remote=remote):
        for layer, attn in zip(order, envoys):
            got: dict = {}
            if layer in wanted:
                _, kwargs = attn.inputs
                got["position_embeddings"] = nnsight.save(kwargs["position_embeddings"])
                got["q"] = nnsight.save(attn.q_proj.output)
                got["k"] = nnsight.save(attn.k_proj.output)
                got["v"] = nnsight.save(attn.v_proj.output)
            if layer in edits or (with_z and layer in wanted):
                z = attn.o_proj.input
                for cols, factor, value, where in edits.get(layer, []):
                    if value is None:
                        z[..., cols] = z[..., cols] * factor
                    elif where is None:
                        z[..., cols] = value.to(z.device, z.dtype) * factor
                    else:
                        z[..., cols] = torch.where(where.to(z.device)[..., None], value.to(z.device, z.dtype) * factor,
                                                   z[..., cols])
                if with_z and layer in wanted:
                    got["z"] = nnsight.save(z)
            out[layer] = got
        out["logits"] = nnsight.save(lm.output.logits)
    return out


def _pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask
