"""Structurally pruned models: per-layer head layouts, resizing attention modules to them, and loading saved ones.

`headlab.prune.structural.remove_heads` makes such a model from a HeadModel and `save_pruned` writes it; this module
holds what loading needs (so `headlab.models` never imports `headlab.prune`). How a family stores its q/k/v/o
projections is data in its `ArchSpec.projections` (`models/arch.py`), so nothing here branches on the family.

Grouped-query attention: a KV group is dropped only when all of its query heads are. HF attention
assumes the same number of query heads per KV group (`num_key_value_groups`). A layer that keeps
uneven counts (e.g. 3, 1 and 2 heads of three groups) keeps exactly its heads and groups: the module
gets its own config copy naming the attention function `headlab_gqa`, which widens k and v from the
kept groups to one per query head (`index_select` by the layer's `kv_slot`, as `repeat_kv` would)
and then calls the model's attention function (headlab's seam under a HeadModel). The KV cache holds
only the kept groups. In a pruned model a head index is a slot of its layer: `pruned_layouts` maps
slots back to the original heads.

A layer whose heads are all removed keeps its attention module (so layer indices do not move) with
0-sized projections and a forward that returns the output projection's bias (0 without bias); it
writes empty `[B, 0, T, D]` entries to a KV cache so the cache's sequence length stays right.
"""

from __future__ import annotations

import copy
import json
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from headlab.capture import eager_function_for
from headlab.errors import HeadlabError, UnsupportedModelError
from headlab.models.arch import ARCHS, Projections
from headlab.models.head_model import HeadModel, resolve_device, resolve_dtype
from headlab.heads import heads_per_group


CONFIG_KEY = "headlab_pruned"




@dataclass(frozen=True)
class LayerLayout:
    """The heads one pruned layer keeps.

    Attributes:
        heads: per query slot, the original query head it holds.
        kv: per KV slot, the original KV group it holds (for GPT-2's multi-head attention, `kv == heads`).
        kv_slot: per query slot, the KV slot it reads.
    """

    heads: tuple[int, ...]
    kv: tuple[int, ...]
    kv_slot: tuple[int, ...]

    @property
    def ratio(self) -> int | None:
        """Query heads per KV group when every kept group keeps the same count (HF's own GQA), else None."""
        if not self.kv or len(self.heads) % len(self.kv):
            return None
        r = len(self.heads) // len(self.kv)
        return r if self.kv_slot == tuple(i // r for i in range(len(self.heads))) else None

    def to_json(self) -> dict[str, list]:
        """The layout as saved in `config.json`."""
        return {"heads": list(self.heads), "kv": list(self.kv), "kv_slot": list(self.kv_slot)}

    @classmethod
    def from_json(cls, data: dict[str, list]) -> "LayerLayout":
        """A layout read back from `config.json`."""
        return cls(heads=tuple(data["heads"]), kv=tuple(data["kv"]), kv_slot=tuple(data["kv_slot"]))


def plan_layout(n_heads: int, n_kv_heads: int, removed: Iterable[int]) -> LayerLayout:
    """The layout of one layer after removing query heads `removed` (a KV group goes with its last head)."""
    removed = set(removed)
    per_group = heads_per_group(n_heads, n_kv_heads)
    heads = tuple(h for h in range(n_heads) if h not in removed)
    kv = tuple(dict.fromkeys(h // per_group for h in heads))
    return LayerLayout(heads=heads, kv=kv, kv_slot=tuple(kv.index(h // per_group) for h in heads))


GQA_IMPLEMENTATION = "headlab_gqa"


def _gqa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any):
    """Widen k, v `[B, G', S, D]` to one per query head `[B, H', S, D]`, then call the model's attention."""
    index = torch.as_tensor(module._headlab_kv_slot, device=key.device)
    key, value = key.index_select(1, index), value.index_select(1, index)
    impl = module._headlab_model_config._attn_implementation
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_function_for(module))
    return fn(module, query, key, value, attention_mask, **kwargs)


def _ensure_gqa_registered() -> None:
    if GQA_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(GQA_IMPLEMENTATION, _gqa_attention)


def projections_of(model: HeadModel) -> Projections:
    """The family's projection layout, or a clear error where structural pruning cannot resize its heads."""
    proj = model.spec.projections
    if proj is None:
        supported = sorted(f for f, spec in ARCHS.items() if spec.projections is not None)
        raise UnsupportedModelError(f"structural pruning supports {', '.join(supported)}, not {model.spec.family}")
    return proj


def _rows(weight: torch.Tensor, slots: tuple[int, ...], dim: int, axis: int) -> torch.Tensor:
    """Gather the `dim`-sized blocks `slots` along `axis` of a weight (e.g. heads' rows of q_proj `[H·D, d]`)."""
    if not slots:
        shape = list(weight.shape)
        shape[axis] = 0
        return weight.new_zeros(shape)
    return torch.cat([weight.narrow(axis, s * dim, dim) for s in slots], dim=axis).contiguous()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` `[out, in]` and `bias` `[out]` (no random init)."""
    with warnings.catch_warnings():  # a 0-sized layer warns that initialising it is a no-op
        warnings.simplefilter("ignore", UserWarning)
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
    return layer


def _conv1d(weight: torch.Tensor, bias: torch.Tensor) -> Conv1D:
    """A GPT-2 Conv1D holding `weight` `[in, out]` and `bias` `[out]`."""
    with torch.device("meta"):
        layer = Conv1D(weight.shape[1], weight.shape[0])
    layer.weight = nn.Parameter(weight.detach().clone())
    layer.bias = nn.Parameter(bias.detach().clone())
    return layer


def _empty_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
    """Forward of an attention module with no heads: the output projection of nothing, and empty KV."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    cache = getattr(cache, "self_attention_cache", cache)
    if cache is not None:
        b, t = hidden_states.shape[:2]
        empty = hidden_states.new_zeros(b, 0, t, self._headlab_head_dim)  # [B, 0, T, D]
        cache.update(empty, empty.clone(), self.layer_idx)
    bias = getattr(self, self._headlab_o_name).bias
    out = torch.zeros_like(hidden_states)  # [B, T, d_model]: no head writes anything
    return (out if bias is None else out + bias), None


def _apply_layer(module: nn.Module, proj: Projections, layout: LayerLayout, head_dim: int,
                 source: nn.Module | None = None) -> None:
    """Resize one attention module to `layout`, copying weights from `source` (original) when given."""
    src = source if source is not None else module
    d = head_dim
    if proj.kind == "separate":
        def cut(name: str, slots, out_axis: bool) -> nn.Linear:
            """The projection `name` cut to `slots` (its output rows, or for o its input columns)."""
            old = getattr(src, name)
            if source is None:  # shape only: the weights come from a state dict later
                slots = [0] * len(slots)
            axis = 0 if out_axis else 1
            w = _rows(old.weight, tuple(slots), d, axis)
            b = old.bias
            if b is not None and out_axis:
                b = _rows(b[:, None], tuple(slots), d, 0)[:, 0]
            return _linear(w, b)
        setattr(module, proj.q, cut(proj.q, layout.heads, True))
        setattr(module, proj.k, cut(proj.k, layout.kv, True))
        setattr(module, proj.v, cut(proj.v, layout.kv, True))
        setattr(module, proj.o, cut(proj.o, layout.heads, False))
        if layout.heads and layout.ratio is not None:
            module.num_key_value_groups = layout.ratio
        elif layout.heads:  # uneven groups: the module's own config routes it through _gqa_attention
            _ensure_gqa_registered()
            module._headlab_model_config = module.config
            module._headlab_kv_slot = layout.kv_slot
            module.config = copy.copy(module.config)
            module.config._attn_implementation = GQA_IMPLEMENTATION
            module.num_key_value_groups = 1
    elif proj.kind == "fused_conv1d":
        fused, out = getattr(src, proj.qkv), getattr(src, proj.o)
        w, b = fused.weight, fused.bias  # [d_model, 3·H·D], [3·H·D]
        width = w.shape[1] // 3
        slots = layout.heads if source is not None else (0,) * len(layout.heads)  # shape only when no source
        parts_w = [_rows(w.narrow(1, i * width, width), slots, d, 1) for i in range(3)]
        parts_b = [_rows(b.narrow(0, i * width, width)[:, None], slots, d, 0)[:, 0] for i in range(3)]
        setattr(module, proj.qkv, _conv1d(torch.cat(parts_w, 1), torch.cat(parts_b)))
        setattr(module, proj.o, _conv1d(_rows(out.weight, slots, d, 0), out.bias))
        module.num_heads = len(layout.heads)
        module.split_size = len(layout.heads) * d
    else:
        raise UnsupportedModelError(f"unknown projection layout {proj.kind!r}")
    if not layout.heads:
        module._headlab_head_dim = d
        module._headlab_o_name = proj.o
        module.forward = types.MethodType(_empty_forward, module)


def apply_layouts(model: HeadModel, layouts: list[LayerLayout], copy_from: HeadModel | None) -> None:
    """Resize every attention module of `model` to its layer's layout, copying weights from `copy_from` if given."""
    proj = projections_of(model)
    for layer, layout in enumerate(layouts):
        source = copy_from.attention_module(layer) if copy_from is not None else None
        _apply_layer(model.attention_module(layer), proj, layout, model.head_dim, source)


def pruned_layouts(model: HeadModel) -> list[LayerLayout] | None:
    """The per-layer layouts of a structurally pruned model (None if it is not one).

    Args:
        model: a HeadModel.

    Returns:
        One LayerLayout per layer (which heads and KV groups each layer keeps), read from the config, or None.
    """
    info = getattr(model.hf.config, CONFIG_KEY, None)
    if not info:
        return None
    return [LayerLayout.from_json(x) for x in info["layers"]]


def is_pruned_folder(folder: str | Path) -> bool:
    """Whether a folder holds a model saved by `save_pruned`.

    Args:
        folder: a directory.

    Returns:
        True when its config.json carries headlab's pruned-layout entry.
    """
    path = Path(folder) / "config.json"
    return path.is_file() and CONFIG_KEY in json.loads(path.read_text())


def load_pruned(folder: str | Path, *, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None, tokenizer: Any = None,
                attn_implementation: str = "sdpa", name: str | None = None) -> HeadModel:
    """Load a folder written by `save_pruned`: build the model from its config, resize each layer, load weights.

    Args:
        folder: the folder `save_pruned` wrote (config.json with the pruned layouts, safetensors weights).
        device: where to run (CUDA when present, else CPU).
        dtype: float32 (default), or "bfloat16" / "float16" or a torch.dtype.
        tokenizer: the tokenizer to attach (default: the one saved in the folder, if any).
        attn_implementation: "sdpa" or "eager", the backend under headlab's seam.
        name: the display name (default: the folder).

    Returns:
        A HeadModel of the pruned model (fewer heads in the pruned layers).

    Raises:
        HeadlabError: not a pruned folder, or weights that do not match its layouts.
    """
    folder = Path(folder)
    if not is_pruned_folder(folder):
        raise HeadlabError(f"{folder} is not a structurally pruned headlab model (no {CONFIG_KEY!r} in config.json)")
    config = transformers.AutoConfig.from_pretrained(folder)
    config._attn_implementation = attn_implementation
    cls = getattr(transformers, (config.architectures or ["AutoModelForCausalLM"])[0])
    torch_dtype = resolve_dtype(dtype)
    hf = cls(config).to(torch_dtype).eval()
    layouts = [LayerLayout.from_json(x) for x in config.headlab_pruned["layers"]]
    shell = HeadModel(hf, None)  # only to find the attention modules; rewrapped below
    apply_layouts(shell, layouts, copy_from=None)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = set(getattr(hf, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise HeadlabError(f"{folder}: weights do not match the pruned layout (missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]})")
    hf.tie_weights()
    hf = hf.to(resolve_device(device), torch_dtype)
    if tokenizer is None and (folder / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    info = config.headlab_pruned
    note = f"structurally pruned: {len(info['removed'])} heads removed from {info['source']}"
    return HeadModel(hf, tokenizer, name=name or str(folder), source=str(folder),
                     note="; ".join(n for n in (info.get("note"), note) if n))
