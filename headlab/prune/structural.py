"""Structural pruning: remove heads' weights for real, save the smaller model, check it against the masked one.

`remove_heads(model, heads)` returns a new HeadModel whose attention projections hold only the kept
heads; it computes what the original computes with those heads zero-ablated (`hl.Ablate(how="zero")`,
i.e. their slice of the output-projection input set to 0), up to float rounding. The layouts, the resizing
and `load_pruned` live in `headlab.models.pruned` (loading a saved model needs no pruning code); the GQA and
emptied-layer rules are described there. Supported: every family whose ArchSpec has `projections` (Llama-like
q/k/v/o and GPT-2's fused Conv1D). The per-layer layout is saved in `config.json` under `headlab_pruned`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch

from headlab.errors import HeadlabError
from headlab.heads import HeadRef, as_heads, by_layer
from headlab.models.head_model import HeadModel
from headlab.models.pruned import (  # noqa: F401  (re-exported: the pruning API in one place)
    CONFIG_KEY,
    LayerLayout,
    apply_layouts,
    is_pruned_folder,
    load_pruned,
    plan_layout,
    projections_of,
    pruned_layouts,
)
from headlab.results import write_json


def layouts_for(model: HeadModel, heads: Iterable[HeadRef]) -> list[LayerLayout]:
    """The per-layer layouts after removing `heads` from `model`.

    Args:
        model: the unpruned HeadModel.
        heads: the heads to remove.

    Returns:
        One LayerLayout per layer: the query heads and KV groups it keeps (a KV group goes when all its heads go).

    Raises:
        HeadIndexError: a head out of range.
    """
    refs = as_heads(heads)
    model.check_heads(refs)
    removed = by_layer(refs)
    return [plan_layout(model.n_heads, model.n_kv_heads, removed.get(l, [])) for l in range(model.n_layers)]


def remove_heads(model: HeadModel, heads: Iterable[HeadRef] | HeadRef) -> HeadModel:
    """A new, smaller HeadModel without `heads` (the original is untouched; a permanent, explicit edit).

    Its logits equal the original's with `heads` zero-ablated (`headlab.prune.costs.equality` measures it).

    Args:
        model: the unpruned HeadModel (GPT-2, Llama-like families).
        heads: the heads to remove.

    Returns:
        The pruned HeadModel (a deep copy with resized projections; its config records the layouts).

    Raises:
        HeadlabError: a model that is already pruned.
        UnsupportedModelError: a family whose projections headlab cannot resize.
        HeadIndexError: a head out of range.
    """
    projections_of(model)  # a clear error for families that cannot be resized
    if pruned_layouts(model) is not None:
        raise HeadlabError(f"{model.name} is already structurally pruned: prune the original model instead")
    refs = as_heads(heads)
    layouts = layouts_for(model, refs)
    hf = copy.deepcopy(model.hf)
    pruned = HeadModel(hf, model.tokenizer, name=f"{model.name} (pruned: -{len(refs)} heads)",
                       source=model.source, note=model.note)
    apply_layouts(pruned, layouts, copy_from=model)
    setattr(hf.config, CONFIG_KEY, {
        "family": model.spec.family, "source": model.source, "note": model.note, "removed": [str(r) for r in refs],
        "layers": [lay.to_json() for lay in layouts],
    })
    return pruned


def save_pruned(model: HeadModel, folder: str | Path) -> Path:
    """Save a pruned HeadModel as safetensors + config.json (+ tokenizer) into `folder`.

    `load_pruned(folder)` reads it back.

    Args:
        model: a model from `remove_heads`.
        folder: the folder to write (created if needed).

    Returns:
        The folder, as a Path.

    Raises:
        HeadlabError: a model that is not structurally pruned.
    """
    if pruned_layouts(model) is None:
        raise HeadlabError(f"{model.name} is not structurally pruned: call remove_heads(model, heads) first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    impl = model.hf.config._attn_implementation
    model.hf.config._attn_implementation = model.backend  # the saved config must not name headlab's seam
    try:
        model.hf.save_pretrained(folder, safe_serialization=True)
    finally:
        model.hf.config._attn_implementation = impl
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    return folder


def prune_and_save(model: HeadModel, heads: Iterable[HeadRef], folder: str | Path, *, seed: int = 0) -> dict:
    """Remove `heads` for real, save the smaller model to `folder`, reload it and check it against the masked model.

    Returns (and writes to `folder/prune_report.json`) the folder, the number of heads removed, the largest logit
    difference to the zero-ablated original (float32 and float64, on random token ids) and the size comparison.
    """
    from headlab.prune.costs import compare, equality

    heads = as_heads(heads)
    folder = Path(folder)
    save_pruned(remove_heads(model, heads), folder)
    loaded = load_pruned(folder, device=model.device, dtype=model.dtype)
    ids = torch.randint(model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))
    check = equality(model, loaded, heads, ids)
    report = {"folder": str(folder), "removed": len(heads),
              "equal_to_1e-5_in_float64": check["max_abs_diff_float64"] < 1e-5,
              **{f"vs_masked_{k}": v for k, v in check.items()}, **compare(model, loaded)}
    write_json(folder / "prune_report.json", report)
    return report
