"""Models across devices: accelerate device maps (CPU and disk offload included), checked before loading.

headlab does not shard models itself: `hl.load(..., device_map=...)` hands the map to transformers'
`from_pretrained(device_map=...)` (folders and bundled names) or to `accelerate.dispatch_model` (model objects),
which place each module on its device and attach accelerate's hooks (inputs moved to a module's execution device,
offloaded weights brought in for its forward and dropped after). This module checks a map before any weight is
read (a HeadlabError naming a device that does not exist or a module the model does not have) and answers the two
questions HeadModel asks of a placed model: where its inputs go (`input_device`) and whether its layers run on more
than one device (`execution_devices`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from headlab.errors import HeadlabError

#: The map names accelerate computes itself from the model's size and `max_memory`.
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
#: Where a module's weights may live besides an accelerator: in CPU memory, or on disk in `offload_folder`.
OFFLOAD = ("cpu", "disk")

DeviceMap = str | Mapping[str, "str | int | torch.device"]


def check_device(value: Any, what: str) -> str | int:
    """A device map value (or a `max_memory` key) as accelerate takes it; HeadlabError naming a bad or absent one.

    Args:
        value: "cpu", "disk", "cuda", "cuda:N", "mps", an int N (CUDA device N) or a torch.device.
        what: how to name the entry in the error (e.g. "device_map['model.layers.3']").

    Returns:
        The value as accelerate takes it ("cpu", "disk", an int CUDA index or a device string).

    Raises:
        HeadlabError: not a device, or a device this machine does not have.
    """
    if isinstance(value, bool):
        raise HeadlabError(f"{what}: {value!r} is not a device (use cpu, disk, cuda:N or N)")
    if isinstance(value, int):
        value = f"cuda:{value}" if value >= 0 else str(value)
    if isinstance(value, str) and value == "disk":
        return "disk"
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise HeadlabError(f"{what}: {value!r} is not a device (use cpu, disk, cuda:N or N)") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= count:
            have = f"only cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            raise HeadlabError(f"{what}: device {value!r} does not exist here ({have}; cpu and disk offload work "
                               "anywhere)")
        return index
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise HeadlabError(f"{what}: device {value!r} does not exist here (no MPS device)")
        return "mps"
    raise HeadlabError(f"{what}: {value!r} is not a device accelerate places modules on (use cpu, disk, cuda:N, "
                       "N or mps)")


def check_device_map(device_map: Any, model: nn.Module | None = None, *, offload_folder: Any = None,
                     max_memory: Any = None) -> tuple[Any, dict | None]:
    """Check a device map (and `max_memory`) against a model skeleton before any weight is placed.

    Args:
        device_map: one of `AUTO_MAPS`, a single device for the whole model, or {module name: device} ("" names the
            whole model); every parameter must fall under some entry.
        model: the model (a meta-device skeleton serves) whose module names the map must use; None skips the name
            checks.
        offload_folder: the folder for "disk" entries (required when some entry is "disk").
        max_memory: {device: bytes or "10GiB"} for the automatic maps, or None.

    Returns:
        (the map as accelerate takes it, max_memory with its keys as accelerate takes them, or None).

    Raises:
        HeadlabError: a device that does not exist, a module name the model does not have, parameters the map gives
            no device, "disk" without an offload folder, or a malformed map or max_memory.
    """
    memory = None
    if max_memory is not None:
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise HeadlabError(f"max_memory must be a mapping {{device: size}}, e.g. {{0: '10GiB', 'cpu': '30GiB'}}; "
                               f"got {max_memory!r}")
        memory = {}
        for key, size in max_memory.items():
            dev = check_device(key, f"max_memory[{key!r}]")
            if dev == "disk":
                raise HeadlabError("max_memory['disk']: disk has no memory budget (it takes whatever does not fit)")
            if isinstance(size, bool) or not isinstance(size, (int, str)) or (isinstance(size, int) and size < 0):
                raise HeadlabError(f"max_memory[{key!r}]: {size!r} is not a size (bytes, or a string like '2GiB')")
            memory[dev] = size
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        return device_map, memory
    if max_memory is not None:
        raise HeadlabError(f"max_memory only applies to the automatic maps ({', '.join(AUTO_MAPS)}); an explicit "
                           "device_map already says where every module goes")
    if isinstance(device_map, str):
        try:
            check_device(device_map, "device_map")
        except HeadlabError:
            raise HeadlabError(f"device_map must be one of {', '.join(AUTO_MAPS)}, a device (cpu, disk, cuda:N) or "
                               f"a mapping {{module name: device}}; got {device_map!r}") from None
    if isinstance(device_map, (str, int, torch.device)):
        device_map = {"": device_map}
    if not isinstance(device_map, Mapping) or not device_map:
        raise HeadlabError(f"device_map must be one of {', '.join(AUTO_MAPS)}, a device, or a non-empty mapping "
                           f"{{module name: device}}; got {device_map!r}")
    checked: dict[str, str | int] = {}
    for name, value in device_map.items():
        if not isinstance(name, str):
            raise HeadlabError(f"device_map keys are module names (strings); got {name!r}")
        checked[name] = check_device(value, f"device_map[{name!r}]")
    if "disk" in checked.values() and offload_folder is None:
        disk = [n or "(whole model)" for n, d in checked.items() if d == "disk"]
        raise HeadlabError(f"device_map puts {', '.join(disk)} on disk: give offload_folder= (a folder for the "
                           "offloaded weights)")
    if model is not None:
        modules = dict(model.named_modules())
        unknown = [n for n in checked if n not in modules]
        if unknown:
            near = sorted({n.rsplit(".", 1)[0] for n in modules if n and "." in n})[:6]
            raise HeadlabError(f"device_map names module(s) {', '.join(map(repr, unknown))} that "
                               f"{type(model).__name__} does not have (its modules include {', '.join(near)}, ...)")
        uncovered = [p for p, _ in model.named_parameters()
                     if not any(n == "" or p == n or p.startswith(n + ".") for n in checked)]
        if uncovered:
            more = f" and {len(uncovered) - 4} more" if len(uncovered) > 4 else ""
            raise HeadlabError(f"device_map gives no device for {', '.join(uncovered[:4])}{more}: map every module "
                               "(or a parent of it)")
    return checked, memory


def meta_skeleton(cls: Any, config: Any) -> nn.Module:
    """The model class built from its config on the meta device (module names and shapes, no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):
            return cls.from_config(config)
        return cls._from_config(config)


def dispatch(model: nn.Module, device_map: Any, *, max_memory: Any = None, offload_folder: Any = None) -> nn.Module:
    """Place an already built model by a device map with accelerate (`infer_auto_device_map` + `dispatch_model`).

    Args:
        model: a transformers model (its weights may be in memory, or on the meta device with an offload already
            attached by accelerate).
        device_map: see `check_device_map`.
        max_memory: for the automatic maps.
        offload_folder: where "disk" entries keep their weights.

    Returns:
        The same model, dispatched (its `hf_device_map` set).

    Raises:
        HeadlabError: a bad map (see `check_device_map`).
    """
    from accelerate import dispatch_model, infer_auto_device_map

    checked, memory = check_device_map(device_map, model, offload_folder=offload_folder, max_memory=max_memory)
    if isinstance(checked, str):
        checked = infer_auto_device_map(model, max_memory=memory,
                                        no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
        if "disk" in checked.values() and offload_folder is None:
            raise HeadlabError(f"the {device_map!r} map puts part of the model on disk (it does not fit max_memory): "
                               "give offload_folder= (a folder for the offloaded weights)")
    dispatch_model(model, device_map=dict(checked), offload_dir=None if offload_folder is None else str(offload_folder))
    model.hf_device_map = dict(checked)
    return model


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed the model by a device map (its modules carry accelerate's hooks)."""
    return isinstance(getattr(model, "hf_device_map", None), Mapping) and any(
        hasattr(m, "_hf_hook") for m in model.modules())


def _execution_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is None and hook is not None:  # a SequentialHook: the first hook that names one
        dev = next((h.execution_device for h in getattr(hook, "hooks", ()) if getattr(h, "execution_device", None)
                    is not None), None)
    if dev is None:
        return None
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids must go: the execution device of its input embeddings (accelerate's hook), else
    the device of its first parameter that is not on the meta device."""
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    for module in ([emb] if emb is not None else []) + [model]:
        for sub in module.modules():
            dev = _execution_device(sub)
            if dev is not None:
                return dev
        if module is emb:
            weight = getattr(emb, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
                return weight.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def execution_devices(modules: list[nn.Module]) -> list[torch.device | None]:
    """The execution device accelerate gives each module (or its first hooked submodule); None where unhooked."""
    out = []
    for module in modules:
        dev = None
        for sub in module.modules():
            dev = _execution_device(sub)
            if dev is not None:
                break
        out.append(dev)
    return out
