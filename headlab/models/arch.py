"""Architecture table: where each HF family keeps its attention, as data plus one registration.

A family is found by `config.model_type`. Its attention modules are the modules, in
registration order, whose class name is in `attn_classes`; each calls transformers'
attention interface with post-RoPE q, k, v, which is the seam headlab captures at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import nn

from headlab.errors import UnsupportedModelError


@dataclass(frozen=True)
class Projections:
    """Where a family keeps its attention projections, as attribute names on the attention module.

    Attributes:
        kind: "separate" (q, k, v, o as `nn.Linear`, weight `[out, in]`, q/o over H·D, k/v over G·D) or
            "fused_conv1d" (GPT-2: one `Conv1D` `qkv` with weight `[d, 3·H·D]` and an `o` `Conv1D` `[H·D, d]`).
        q, k, v: the separate projections' names. qkv: the fused one's name. o: the output projection's name.
    """

    kind: Literal["separate", "fused_conv1d"]
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str = "c_attn"


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """How one HF model family lays out its attention heads.

    Attributes:
        family: name of the family (the HF `model_type`).
        attn_classes: class names of the modules that call the attention interface.
        out_proj: path of the output projection relative to an attention module;
            each leading `..` steps up to the parent module.
        out_proj_kind: "linear" (weight [out, in]) or "conv1d" (GPT-2's Conv1D, weight [in, out]).
        causal: whether the self-attention is causal.
        attach: for families whose attention modules compute attention themselves instead of calling
            transformers' attention interface (fla's layers): `attach(module)` makes the module call
            headlab's seam (`capture.headlab_attention`) and is called on every attention module when
            the model is wrapped. Such families keep their attn_implementation.
        geometry: `geometry(config) -> (n_heads, n_kv_heads, head_dim)` for configs without the usual
            `num_attention_heads` / `num_key_value_heads` / `head_dim` fields (head_dim: the width of one
            head's slice of the output-projection input).
        prepare: `prepare(model)` is called once on the whole model when it is wrapped, before `attach`
            (fla: torch forwards for its Triton-only norms and MLPs where there is no GPU).
        projections: the layout of the q/k/v/o projections on the attention module (what structural pruning
            resizes); None where headlab cannot resize the family's heads.
    """

    family: str
    attn_classes: tuple[str, ...]
    out_proj: str
    out_proj_kind: str = "linear"
    causal: bool = True
    attach: Callable[[nn.Module], None] | None = None
    geometry: Callable[[object], tuple[int, int, int]] | None = None
    prepare: Callable[[nn.Module], None] | None = None
    projections: Projections | None = None


ARCHS: dict[str, ArchSpec] = {}


def register_arch(*model_types: str, spec: ArchSpec) -> None:
    """Register `spec` for each HF `model_type` (the one place an architecture is added).

    Args:
        model_types: HF config `model_type` names (e.g. "llama", "mistral").
        spec: how to find the attention modules, the output projection and the geometry of that family.
    """
    for model_type in model_types:
        ARCHS[model_type] = spec


SEPARATE = Projections("separate")
register_arch("llama", spec=ArchSpec(family="llama", attn_classes=("LlamaAttention",), out_proj="o_proj",
                                     projections=SEPARATE))
register_arch("mistral", spec=ArchSpec(family="mistral", attn_classes=("MistralAttention",), out_proj="o_proj",
                                       projections=SEPARATE))
register_arch("qwen2", spec=ArchSpec(family="qwen2", attn_classes=("Qwen2Attention",), out_proj="o_proj",
                                     projections=SEPARATE))
register_arch(
    "gpt2",
    spec=ArchSpec(family="gpt2", attn_classes=("GPT2Attention",), out_proj="c_proj", out_proj_kind="conv1d",
                  projections=Projections("fused_conv1d", qkv="c_attn", o="c_proj")),
)
register_arch(
    "bert",
    spec=ArchSpec(family="bert", attn_classes=("BertSelfAttention",), out_proj="..output.dense", causal=False),
)
register_arch(
    "roberta",
    spec=ArchSpec(family="roberta", attn_classes=("RobertaSelfAttention",), out_proj="..output.dense", causal=False),
)

# a Llama-family model linearized head by head (headlab.models.linearized)
register_arch(
    "headlab_linearized",
    spec=ArchSpec(family="headlab_linearized", attn_classes=("LinearizedLlamaAttention",), out_proj="o_proj"),
)

# headlab's own linear-attention LMs (headlab.models.linear): one module class for every mixer kind
register_arch(
    "headlab_linear",
    spec=ArchSpec(family="headlab_linear", attn_classes=("HeadlabLinearAttention",), out_proj="o_proj"),
)


def arch_for(model: nn.Module) -> ArchSpec:
    """The ArchSpec of an HF model, or a clear error naming the families headlab supports."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedModelError(
            f"headlab has no adapter for model_type {model_type!r} ({type(model).__name__}); "
            f"supported families: {', '.join(sorted(ARCHS))}. "
            "Add one with headlab.models.arch.register_arch(...)."
        )
    return ARCHS[model_type]


def find_attention_modules(model: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Module]]:
    """The attention modules of `model` in layer order, with their qualified names."""
    found = [(name, mod) for name, mod in model.named_modules() if type(mod).__name__ in spec.attn_classes]
    if not found:
        raise UnsupportedModelError(
            f"found no {'/'.join(spec.attn_classes)} module in {type(model).__name__}: "
            f"the {spec.family} adapter does not match this model"
        )
    return found


def resolve_relative(model: nn.Module, name: str, rel: str) -> nn.Module:
    """Resolve `rel` (e.g. `o_proj` or `..output.dense`) against the module called `name` in `model`."""
    parts = name.split(".") if name else []
    rest = rel
    while rest.startswith(".."):
        parts = parts[:-1]
        rest = rest[2:].lstrip(".")
    target = ".".join(parts + ([rest] if rest else []))
    return model.get_submodule(target)
