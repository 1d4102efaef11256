"""`headlab.load`: bundled names, local HF folders, HF models, TransformerBridges and nnsight models."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from headlab.errors import HeadlabError, ModelNotFoundError, UnsupportedModelError, WeightsError
from headlab.models.arch import ARCHS
from headlab.models.bundled import BUNDLED
from headlab.models.head_model import HeadModel, resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from headlab.models.placement import check_device_map, dispatch, is_dispatched, meta_skeleton

def load(source: Any, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         tokenizer: Any = None, attn_implementation: str = "sdpa", device_map: Any = None, max_memory: Any = None,
         offload_folder: str | Path | None = None) -> HeadModel:
    """Load or wrap a model as a HeadModel.

    Args:
        source: a bundled name (see `headlab.BUNDLED`), a local HF folder, a transformers model, a
            TransformerLens 4 TransformerBridge, or an nnsight model.
        device: where to run (CUDA when present, else CPU). Models passed in as objects are moved too.
        dtype: float32 (default) or bfloat16 for names and folders; objects keep theirs unless given.
        tokenizer: a tokenizer for model objects that carry none.
        attn_implementation: the backend headlab calls under its seam, "sdpa" or "eager" (folders and names).
        device_map: spread the model over devices with accelerate instead of putting it on `device`: "auto",
            "balanced", "balanced_low_0", "sequential", or {module name: device} with devices "cpu", "disk"
            (offloaded to `offload_folder`), "cuda:N" / N. Names and folders go through transformers'
            `from_pretrained(device_map=...)` (weights placed as they are read: a model larger than any one device
            loads); model objects through `accelerate.dispatch_model`. See `headlab.models.placement`.
        max_memory: {device: size} budgets for the automatic maps, e.g. {0: "10GiB", "cpu": "30GiB"}.
        offload_folder: where "disk" entries keep their weights.

    Returns:
        A HeadModel whose attention runs through headlab's seam (hub kernels off: transformers' own torch layers).
        With a device map, inputs go to the input embeddings' device and captured records are gathered there
        (`HeadModel.device`).

    Raises:
        ModelNotFoundError: an unknown name, a path that is no HF folder, no safetensors weights (pickles are never
            loaded), or a corrupt config or checkpoint.
        WeightsError: weights missing, unexpected or wrongly shaped for the folder's config.
        UnsupportedModelError: a model family headlab has no adapter for.
        HeadlabError: a device map naming a device that does not exist or a module the model does not have, "disk"
            without an offload folder, both `device` and `device_map`, or a device map for a structurally pruned
            folder.
    """
    placement = None
    if device_map is not None:
        if device is not None:
            raise HeadlabError("give device= or device_map=, not both (a device map says where every module goes)")
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    elif max_memory is not None or offload_folder is not None:
        raise HeadlabError("max_memory and offload_folder only apply with a device_map")
    dev = resolve_device(device)
    if isinstance(source, (str, Path)):
        name = str(source)
        if name in BUNDLED:
            folder = BUNDLED[name].folder()
            model = load_folder(folder, device=dev, dtype=resolve_dtype(dtype), tokenizer=tokenizer,
                                attn_implementation=attn_implementation, name=name, placement=placement)
            model.note = BUNDLED[name].note
            return model
        path = Path(name).expanduser()
        if path.exists():
            return load_folder(path, device=dev, dtype=resolve_dtype(dtype), tokenizer=tokenizer,
                               attn_implementation=attn_implementation, name=str(path), placement=placement)
        raise ModelNotFoundError(f"unknown model {name!r}: not a bundled name ({', '.join(BUNDLED)}) and no such "
                                 "folder. Pass a bundled name, a local HF folder (config.json + *.safetensors), an HF "
                                 "model, a TransformerBridge or an nnsight model.")
    hf_model, tok, label = _unwrap(source)
    if placement is not None:
        if dtype is not None:
            hf_model = hf_model.to(resolve_dtype(dtype))
        hf_model = dispatch(hf_model, **placement)
    elif is_dispatched(hf_model):  # placed by accelerate already (e.g. meta-initialised + load_checkpoint_and_dispatch)
        if device is not None or dtype is not None:
            raise HeadlabError(f"{label} is already placed by a device map ({hf_model.hf_device_map}): load it without "
                               "device= and dtype= (moving it would undo accelerate's placement)")
    else:
        hf_model = hf_model.to(dev) if dtype is None else hf_model.to(dev, resolve_dtype(dtype))
    return HeadModel(hf_model, tokenizer if tokenizer is not None else tok, name=label, source=label)


def worker_source(model: HeadModel, runner: str) -> str:
    """The bundled name or folder another process (a sweep's worker) loads `model` from.

    Args:
        model: the HeadModel the sweep runs on.
        runner: who loads it, for the message (e.g. "ray").

    Returns:
        `model.source`.

    Raises:
        UnsupportedModelError: the model was loaded from an object, so no other process can load it.
    """
    if Path(model.source).is_dir() or model.source in BUNDLED:
        return model.source
    raise UnsupportedModelError(f"a {runner} executor loads the model in each worker from its name or folder; "
                                f"{model.name} was loaded from an object: save it (save_pretrained) and load the "
                                "folder")


def _unwrap(source: Any) -> tuple[nn.Module, Any, str]:
    """(HF model, tokenizer, display name) from an HF model, a TransformerBridge or an nnsight model.

    A TransformerBridge yields a plain view of its HF model (see `_unbridged`), not the bridged module
    tree itself; an nnsight model built from a name or a path is dispatched first (until then its
    weights are on the meta device).
    """
    kind = type(source).__module__.split(".")[0]
    if isinstance(source, transformers.PreTrainedModel):
        return source, None, getattr(source.config, "_name_or_path", "") or type(source).__name__
    if kind == "transformer_lens" and hasattr(source, "original_model"):
        hf_model = _unbridged(source.original_model)
        return hf_model, getattr(source, "tokenizer", None), f"bridge:{_label(hf_model)}"
    if kind == "nnsight" and hasattr(source, "_module"):
        if getattr(source, "dispatched", True) is False and callable(getattr(source, "dispatch", None)):
            source.dispatch()
        hf_model = source._module
        if isinstance(hf_model, transformers.PreTrainedModel):
            return hf_model, getattr(source, "tokenizer", None), f"nnsight:{_label(hf_model)}"
    raise UnsupportedModelError(
        f"headlab cannot wrap a {type(source).__module__}.{type(source).__name__}: pass a bundled name "
        f"({', '.join(BUNDLED)}), a local HF folder, a transformers PreTrainedModel, a TransformerBridge or an "
        "nnsight model wrapping a transformers model"
    )


def _unbridged(model: nn.Module) -> nn.Module:
    """The HF model under a TransformerBridge as a plain HF module tree that shares the bridge's weights.

    Booting a bridge swaps HF submodules for bridge components in place, and some of those (GPT-2's
    JointQKVAttentionBridge, Llama's PositionEmbeddingsAttentionBridge) recompute attention themselves
    instead of calling the HF attention module, so headlab's seam would never run: no capture, and edits
    that silently do nothing. This view puts back the HF module each bridge component wraps. Its modules
    are shallow copies that share their `_parameters` and `_buffers` dicts with the bridge's (the same
    tensors; moves and casts reach both), and it has its own copy of the config, so wrapping it (which
    switches its attention implementation) leaves the bridge on eager and its hooks working.
    """
    config = getattr(model, "config", None)
    memo: dict[int, Any] = {}
    if config is not None:
        copy.deepcopy(config, memo)
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> nn.Module:
        while type(module).__module__.startswith("transformer_lens.") and hasattr(module, "original_component"):
            inner = module.original_component
            if not isinstance(inner, nn.Module):
                raise UnsupportedModelError(f"the bridge component {type(module).__name__} wraps no HF module: "
                                            "load the model's folder or HF model instead")
            module = inner
        if id(module) in done:
            return done[id(module)]
        view = copy.copy(module)
        done[id(module)] = view
        view.__dict__["_modules"] = {name: None if child is None else visit(child)
                                     for name, child in module._modules.items()}
        for key, value in list(view.__dict__.items()):
            if isinstance(value, transformers.PretrainedConfig) and id(value) in memo:
                view.__dict__[key] = memo[id(value)]
        return view

    return visit(model)


def _label(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def check_loading_info(folder: Path, info: dict) -> None:
    """Refuse a folder whose weights do not fill the model exactly: transformers would fill the gaps with random
    tensors and only log a table (logits then differ by ~10 with nothing to say so)."""
    missing, unexpected = list(info.get("missing_keys", [])), list(info.get("unexpected_keys", []))
    mismatched = [f"{k} (file {tuple(a)} vs model {tuple(b)})" for k, a, b in info.get("mismatched_keys", [])]
    problems = [f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''} ({len(keys)})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                if keys]
    if problems:
        raise WeightsError(f"{folder}: the weights do not match the model's config — " + "; ".join(problems))


def load_folder(folder: Path, *, device: torch.device, dtype: torch.dtype, tokenizer: Any = None,
                attn_implementation: str = "sdpa", name: str | None = None, placement: dict | None = None) -> HeadModel:
    """Load a local HF folder (safetensors weights only: no unpickling of files from a path).

    `placement` ({device_map, max_memory, offload_folder}, see `load`) loads it through transformers'
    `from_pretrained(device_map=...)` after checking the map against the class built on the meta device.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{folder} is not an HF model folder: it has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found only {', '.join(pickles)}: convert them to safetensors first)" if pickles else ""
        raise ModelNotFoundError(f"{folder} has no *.safetensors weights{hint}; headlab never unpickles weights "
                                 "from a path")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelNotFoundError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{config_path} is not an HF config (a JSON object)")
    if "headlab_pruned" in config:  # structurally pruned (headlab.prune): per-layer head counts
        if placement is not None:
            raise HeadlabError(f"{folder} is a structurally pruned model: it loads on one device (no device_map)")
        from headlab.models.pruned import load_pruned

        return load_pruned(folder, device=device, dtype=dtype, tokenizer=tokenizer,
                           attn_implementation=attn_implementation, name=name)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:  # not a transformers class: one registered with the Auto classes (headlab's own models)
        cls = transformers.AutoModelForCausalLM if arch and arch.endswith("ForCausalLM") else transformers.AutoModel
    spec = ARCHS.get(config.get("model_type"))
    own_attention = spec is not None and spec.attach is not None  # fla's layers: no attention backend to choose
    if own_attention:
        from headlab.models.fla_adapter import import_fla_for

        import_fla_for(config.get("model_type"))
    impl = {} if own_attention else {"attn_implementation": attn_implementation}
    if placement is not None:
        impl.update(_placement_kwargs(folder, cls, placement))
    # use_kernels=False: transformers (>= 5.25) otherwise "kernelizes" layers (norms, rotary) with kernels from
    # the HF hub; headlab studies the computation transformers' own torch code defines, offline
    try:
        hf_model, info = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, use_kernels=False,
                                             output_loading_info=True, ignore_mismatched_sizes=True, **impl)
    except Exception as err:  # a corrupt config or checkpoint: transformers and safetensors raise many types
        raise ModelNotFoundError(f"{folder} could not be loaded as an HF model folder: {err}") from err
    check_loading_info(folder, info)
    if placement is None:
        hf_model = hf_model.to(device)
    if tokenizer is None and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return HeadModel(hf_model, tokenizer, name=name or str(folder), source=str(folder))


def _placement_kwargs(folder: Path, cls: Any, placement: dict) -> dict:
    """from_pretrained's placement keywords, the map checked against the class built on the meta device."""
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as err:  # the same corrupt config from_pretrained would refuse
        raise ModelNotFoundError(f"{folder}: config.json could not be read as an HF config: {err}") from err
    skeleton = meta_skeleton(cls, config)
    device_map, memory = check_device_map(placement["device_map"], skeleton,
                                          offload_folder=placement.get("offload_folder"),
                                          max_memory=placement.get("max_memory"))
    kwargs: dict[str, Any] = {"device_map": device_map}
    if memory is not None:
        kwargs["max_memory"] = memory
    if placement.get("offload_folder") is not None:
        kwargs["offload_folder"] = str(placement["offload_folder"])
    return kwargs
