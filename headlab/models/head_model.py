"""HeadModel: one protocol over every supported model for reaching, capturing and editing heads."""

from __future__ import annotations

import inspect
import itertools
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from headlab.capture import (
    IMPLEMENTATION,
    Capture,
    LayerRecord,
    LayerSlot,
    activate,
    eager_function_for,
    ensure_registered,
    input_hook,
)
from headlab.errors import HeadIndexError, HeadlabError, PromptError, UnsupportedModelError
from headlab.heads import HeadRef, as_heads, heads_per_group
from headlab.losses import next_token_losses
from headlab.models.arch import arch_for, find_attention_modules, resolve_relative
from headlab.models.layers import LayerInputs, record_layer_inputs
from headlab.models.placement import input_device, is_dispatched
from headlab.run import Batch, Run

if TYPE_CHECKING:
    from headlab.stats import StatsRun

from transformers.integrations.sdpa_attention import sdpa_attention_forward

Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | Batch

_owner_ids = itertools.count(1)


def _reset_hub_kernels(model: nn.Module) -> None:
    """Put back transformers' own torch forwards where a model was "kernelized" with HF hub kernels.

    transformers (>= 5.25) loads models with `use_kernels` on by default: layers marked for the kernel hub
    (RMSNorm, rotary embeddings, `apply_rotary_pos_emb`) may be swapped for downloaded kernels. Attention
    itself still goes through the attention interface (hence headlab's seam), but headlab promises patterns
    and edits on exactly the computation the model defines, reproducibly and offline, so a wrapped model runs
    the torch implementations. (Models headlab loads itself are loaded with `use_kernels=False`.)
    """
    if getattr(model, "use_kernels", False) and callable(getattr(model, "reset_kernels", None)):
        model.reset_kernels()
        warnings.warn(f"{type(model).__name__} was loaded with HF hub kernels (transformers' default): headlab "
                      "reset it to transformers' torch layers so that it studies the model's own computation; "
                      "load with use_kernels=False to silence this", stacklevel=3)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, else CPU, unless a device is given (a HeadlabError names a bad or absent one)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HeadlabError(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HeadlabError(f"device {device}: no CUDA device here (use cpu)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """float32 unless given; names "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16" or a torch.dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def output_cache(output: Any) -> Any:
    """The KV cache of an HF model output (`cache`, or `past_key_values` before transformers 5.x; None if neither)."""
    cache = output.get("cache", None)
    return output.get("past_key_values", None) if cache is None else cache


class HeadModel:
    """A softmax- or linear-attention model wrapped for head-level study.

    Attributes:
        hf: the wrapped transformers model (its attention now routes through headlab's seam).
        tokenizer: its tokenizer, or None (then prompts must be token ids).
        name: a display name (the bundled name, the folder, or the class).
        n_layers: the number of attention layers.
        n_heads: query heads per layer (H).
        n_kv_heads: key/value heads per layer (G; H with plain multi-head attention).
        head_dim: the dimension D of each head's q, k and v.
        causal: whether self-attention is causal.
        max_context: the longest input the model's positions allow (None if unbounded).
        note: what a reader of results on this model must know (e.g. quantised weights).
        layer_kinds: each layer's attention kind: "softmax" for HF families; for headlab's linear LMs
            also "swa", "linear", "hedgehog", "based", "gla" or "deltanet" (implicit patterns).
        source: where the model came from (the bundled name or folder; the display name otherwise).
        device_map: {module name: device} when accelerate spread the model over devices (`hl.load(...,
            device_map=...)`; "cpu" / "disk" entries are offloaded weights), else None. Then `device` is where
            inputs go (the input embeddings' execution device), and every record a capture keeps or hands to a
            callback (`run`, `stats`, `capturing`) is gathered there, so patterns and statistics of all layers
            come out on that one device; edits act on each layer's own device.

    Args:
        model: a transformers model (`hl.load` builds HeadModels from names, folders, TransformerLens bridges and
            nnsight models); wrapping it routes its attention through headlab's seam.
        tokenizer: its tokenizer, or None.
        name: the display name (default: the config's `_name_or_path`, else the class name).
        source: where it came from (default: `name`).
        note: what a reader of results on this model must know.

    Raises:
        UnsupportedModelError: a model family headlab has no adapter for, or one whose attention cannot be routed
            through the seam.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, name: str | None = None,
                 source: str | None = None, note: str = "") -> None:
        ensure_registered()
        _reset_hub_kernels(model)
        self.hf = model.eval()
        self.tokenizer = tokenizer
        self.spec = arch_for(model)
        self._attn = find_attention_modules(model, self.spec)
        cfg = model.config
        self.name = name or getattr(cfg, "_name_or_path", "") or type(model).__name__
        self.source = source or self.name
        self.note = note
        self.n_layers = len(self._attn)
        if self.spec.geometry is not None:
            self.n_heads, self.n_kv_heads, self.head_dim = map(int, self.spec.geometry(cfg))
        else:
            self.n_heads = int(cfg.num_attention_heads)
            self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
            self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.causal = bool(getattr(self._attn[0][1], "is_causal", self.spec.causal))
        self.max_context = getattr(cfg, "max_position_embeddings", None)
        self.vocab_size = getattr(cfg, "vocab_size", None)
        self.is_lm = hasattr(model, "lm_head") or type(model).__name__.endswith(("LMHeadModel", "ForCausalLM"))
        self.device_map = dict(model.hf_device_map) if is_dispatched(model) else None
        self._owner = next(_owner_ids)

        original = getattr(cfg, "_attn_implementation", None)
        if original == IMPLEMENTATION:  # wrapped before: keep the backend that wrap chose
            original = self._attn[0][1].__dict__["_headlab_slot"].base_name
        self.backend = original if original in ("sdpa", "eager") else "sdpa"
        if self.spec.prepare is not None:
            self.spec.prepare(model)
        if self.spec.attach is not None:
            for _, module in self._attn:
                self.spec.attach(module)
        self.layer_kinds = [str(getattr(module, "kind", "softmax")) for _, module in self._attn]
        for layer, (_, module) in enumerate(self._attn):
            # a module that computes its own attention form (a linear layer) names its backend
            own = module.headlab_backend(self.backend) if hasattr(module, "headlab_backend") else None
            base = own or (eager_function_for(module) if self.backend == "eager" else sdpa_attention_forward)
            module._headlab_slot = LayerSlot(owner=self._owner, layer=layer, base=base, base_name=self.backend,
                                             module_id=id(module))
            # hands the module's input to a Gate edit (MoH routing) that asks for it; a no-op otherwise
            module.register_forward_pre_hook(input_hook(self._owner, layer), with_kwargs=True)
        if self.spec.attach is None:
            self._use_seam(model)

    @staticmethod
    def _use_seam(model: nn.Module) -> None:
        cfg = model.config
        model.set_attn_implementation(IMPLEMENTATION)
        if getattr(cfg, "_attn_implementation", None) != IMPLEMENTATION:
            raise UnsupportedModelError(
                f"{type(model).__name__} refused attn_implementation={IMPLEMENTATION!r} (transformers allows it only "
                "for models whose attention modules call ALL_ATTENTION_FUNCTIONS.get_interface): headlab's seam "
                "would never run, so captures and edits would silently do nothing")

    def __repr__(self) -> str:
        groups = f" ({self.n_kv_heads} KV groups)" if self.n_kv_heads != self.n_heads else ""
        kind = "causal" if self.causal else "bidirectional"
        return (f"HeadModel({self.name}: {self.n_layers} layers × {self.n_heads} heads{groups}, head dim "
                f"{self.head_dim}, {kind}, {self.device.type}/{str(self.dtype).removeprefix('torch.')})")

    @property
    def device(self) -> torch.device:
        """Where inputs go and records end up: the device of the model's parameters, or with a device map the
        execution device of its input embeddings (see `device_map`)."""
        if self.device_map is not None:
            return input_device(self.hf)
        return next(self.hf.parameters()).device

    def _capture(self, **kwargs: Any) -> Capture:
        """The one place captures are made: records of a model spread over devices are gathered on `device`."""
        return Capture(device=self.device if self.device_map is not None else None, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters."""
        return next(self.hf.parameters()).dtype

    @property
    def owner(self) -> int:
        """The key under which this model's captures and edits are activated."""
        return self._owner

    # heads

    def heads(self, layers: Iterable[int] | None = None) -> list[HeadRef]:
        """Every query head, or those of the given layers.

        Args:
            layers: layer indices (None: every layer).

        Returns:
            HeadRefs in (layer, head) order.

        Raises:
            HeadIndexError: a layer out of range.
        """
        layers = range(self.n_layers) if layers is None else list(layers)
        self.check_layers(layers)
        return [HeadRef(layer, head) for layer in layers for head in range(self.n_heads)]

    def check_layers(self, layers: Iterable[int]) -> None:
        """Raise HeadIndexError naming the first layer index that is not an int in 0..n_layers-1.

        Args:
            layers: layer indices to check.

        Raises:
            HeadIndexError: a layer index that is not an int in range.
        """
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise HeadIndexError(f"layer {layer!r} is out of range: {self.name} has layers 0..{self.n_layers - 1}")

    def check_heads(self, heads: Iterable[HeadRef]) -> None:
        """Raise HeadIndexError naming the first head whose layer or head index is out of range.

        Args:
            heads: HeadRefs to check.

        Raises:
            HeadIndexError: a head whose layer or head index is out of range.
        """
        for ref in heads:
            self.check_layers([ref.layer])
            if not 0 <= ref.head < self.n_heads:
                raise HeadIndexError(f"head {ref} is out of range: {self.name} has heads 0..{self.n_heads - 1} "
                                     f"in each of its {self.n_layers} layers")

    def kv_group(self, head: HeadRef) -> int:
        """The KV group (key/value head) that a query head reads.

        Args:
            head: a query head.

        Returns:
            The index of its KV head, `head.head // (n_heads // n_kv_heads)`.
        """
        return head.head // heads_per_group(self.n_heads, self.n_kv_heads)

    def attention_module(self, layer: int) -> nn.Module:
        """The HF attention module of a layer (the one that calls headlab's seam).

        Args:
            layer: the layer index.

        Returns:
            The attention `nn.Module` of that layer.

        Raises:
            HeadIndexError: a layer out of range.
        """
        self.check_layers([layer])
        return self._attn[layer][1]

    def out_proj(self, layer: int) -> nn.Module:
        """The output projection of a layer; head h's input slice is `[h*D, (h+1)*D)`.

        Args:
            layer: the layer index.

        Returns:
            The projection `nn.Module` (e.g. `o_proj`, `c_proj`) that maps the concatenated head outputs back.

        Raises:
            HeadIndexError: a layer out of range.
        """
        self.check_layers([layer])
        name, _ = self._attn[layer]
        return resolve_relative(self.hf, name, self.spec.out_proj)

    # prompts

    def encode(self, prompt: Prompt, *, prepend_bos: bool = False, truncate: int | None = None) -> Batch:
        """Turn a prompt into a right-padded Batch on the model's device.

        The prompt is text, texts, token ids (flat, nested or a tensor), a Batch or a tokenizer's output (a mapping
        with `input_ids` and `attention_mask`). A Batch or tokenizer output is validated: 2-D integer ids, a 0/1 mask of the same shape whose real tokens are
        contiguous; left padding (`padding_side="left"`) is moved to the right (absolute positions then start at 0, as
        for an unpadded prompt), and padded slots get the model's pad id.

        Args:
            prompt: the prompt, in any of the forms above.
            prepend_bos: put the model's BOS first (before `truncate`).
            truncate: cut each item to this many tokens (BOS included) before the context check; a cut item keeps
                its closing special token.

        Returns:
            A right-padded Batch on the model's device.

        Raises:
            PromptError: empty, malformed (float ids, a non-0/1 or holed mask, wrong shapes), out-of-vocabulary or
                longer than the model's context.
        """
        if isinstance(prompt, Batch):
            batch = self._normalise_batch(prompt.input_ids, prompt.attention_mask)
        elif isinstance(prompt, Mapping) and "input_ids" in prompt:
            ids = prompt["input_ids"]
            mask = prompt.get("attention_mask")
            ids = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
            mask = torch.ones_like(ids) if mask is None else (mask if isinstance(mask, torch.Tensor)
                                                              else torch.as_tensor(mask))
            batch = self._normalise_batch(ids, mask)
        elif isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                         and all(isinstance(p, str) for p in prompt)):
            batch = self._encode_text([prompt] if isinstance(prompt, str) else list(prompt))
        else:
            batch = self._encode_ids(prompt)
        if prepend_bos:
            batch = self._prepend_bos(batch)
        if truncate is not None:
            batch = self._truncate(batch, truncate)
        self._check_batch(batch)
        return batch.to(self.device)

    def _truncate(self, batch: Batch, max_tokens: int) -> Batch:
        """Each item cut to `max_tokens` (BOS included); a cut item keeps its closing special token (e.g. [SEP])."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise PromptError(f"truncate must be a positive number of tokens, got {max_tokens!r}")
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        ids, mask = batch.input_ids, batch.attention_mask
        out_ids, out_mask = ids[:, :max_tokens].clone(), mask[:, :max_tokens].clone()
        for b, n in enumerate(batch.lengths):
            if n > max_tokens and int(ids[b, n - 1]) in special:
                out_ids[b, max_tokens - 1] = ids[b, n - 1]
        return Batch(out_ids, out_mask)

    def _encode_text(self, texts: list[str]) -> Batch:
        if self.tokenizer is None:
            raise PromptError(f"{self.name} has no tokenizer: pass token ids (a list of ints or a LongTensor) "
                              "instead of text")
        if not texts or any(not t for t in texts):
            raise PromptError("empty prompt: give at least one token of text")
        enc = self.tokenizer(texts, add_special_tokens=True, return_attention_mask=True)
        return _pad([torch.tensor(ids, dtype=torch.long) for ids in enc["input_ids"]], self.pad_id)

    def _encode_ids(self, ids: Any) -> Batch:
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise PromptError(f"token ids must be integers, got a {ids.dtype} tensor")
            if ids.dim() == 1:
                ids = ids[None]
            if ids.dim() != 2:
                raise PromptError(f"token ids must be [T] or [B, T], got shape {tuple(ids.shape)}")
            if ids.numel() == 0:
                raise PromptError("empty prompt: the token id tensor has no tokens")
            ids = ids.long().cpu()
            return Batch(ids, torch.ones_like(ids))
        if isinstance(ids, (list, tuple)):
            if not ids:
                raise PromptError("empty prompt: give at least one token")
            rows = [ids] if all(isinstance(x, int) for x in ids) else list(ids)
            seqs = []
            for row in rows:
                if not isinstance(row, (list, tuple, torch.Tensor)) or len(row) == 0:
                    raise PromptError(f"empty or malformed prompt row: {row!r}")
                if not all(isinstance(x, int) for x in (row.tolist() if isinstance(row, torch.Tensor) else row)):
                    raise PromptError("token ids must be ints (or pass text strings)")
                seqs.append(torch.as_tensor(row, dtype=torch.long))
            return _pad(seqs, self.pad_id)
        raise PromptError(f"cannot read a prompt from {type(ids).__name__}: pass text, a list of texts, token ids, "
                          "or a [B, T] LongTensor")

    def _prepend_bos(self, batch: Batch) -> Batch:
        bos = self.bos_id
        if bos is None:
            raise PromptError(f"{self.name} has no BOS token id to prepend")
        need = batch.input_ids[:, 0] != bos
        if not bool(need.any()):
            return batch
        seqs = [torch.cat([torch.tensor([bos]), ids[:n]]) if add else ids[:n]
                for ids, n, add in zip(batch.input_ids.cpu(), batch.lengths, need.tolist())]
        return _pad(seqs, self.pad_id)

    def _normalise_batch(self, ids: Any, mask: Any) -> Batch:
        """A user-built batch, checked and right-padded (see `encode`)."""
        if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor):
            raise PromptError("a Batch holds two tensors, input_ids and attention_mask")
        if ids.dim() == 1:
            ids, mask = ids[None], mask[None] if mask.dim() == 1 else mask
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise PromptError(f"Batch input_ids must be [B, T] with an attention_mask of the same shape; got "
                              f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        if ids.shape[0] == 0:
            raise PromptError("empty prompt: the Batch has no items")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise PromptError(f"Batch input_ids must be integers, got {ids.dtype}")
        if mask.dtype.is_floating_point and not torch.isfinite(mask).all():
            raise PromptError("Batch attention_mask holds NaN or inf: it must be 0/1")
        if not ((mask == 0) | (mask == 1)).all():
            raise PromptError(f"Batch attention_mask must be 0/1, got values {sorted(set(mask.unique().tolist()))[:6]}")
        ids, mask = ids.long().cpu(), mask.long().cpu()
        seqs = []
        for i in range(ids.shape[0]):
            real = mask[i].nonzero().flatten()
            if real.numel() and int(real[-1] - real[0] + 1) != real.numel():
                raise PromptError(f"Batch item {i}: the attention mask has holes (real tokens at "
                                  f"{real.tolist()[:8]}...): real tokens must be contiguous")
            first = int(real[0]) if real.numel() else 0
            seqs.append(ids[i, first:first + real.numel()])  # left padding (first > 0) moves to the right
        return _pad(seqs, self.pad_id)

    def _check_batch(self, batch: Batch) -> None:
        ids = batch.input_ids
        if ids.shape[1] == 0 or min(batch.lengths) == 0:
            raise PromptError("empty prompt: every batch item needs at least one token")
        if self.max_context is not None and ids.shape[1] > self.max_context:
            raise PromptError(f"prompt of {ids.shape[1]} tokens is longer than {self.name}'s context of "
                              f"{self.max_context} tokens")
        real = ids[batch.attention_mask.bool()]
        if self.vocab_size is not None and (int(real.min()) < 0 or int(real.max()) >= self.vocab_size):
            raise PromptError(f"token ids must lie in 0..{self.vocab_size - 1} for {self.name}; got "
                              f"{int(real.min())}..{int(real.max())}")

    @property
    def bos_id(self) -> int | None:
        """The BOS token id (the tokenizer's, else the config's), or None when the model has none."""
        tok_bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
        return tok_bos if tok_bos is not None else getattr(self.hf.config, "bos_token_id", None)

    @property
    def pad_id(self) -> int:
        """The id written at padded positions (masked out, so any in-vocabulary id serves)."""
        candidates = [getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None,
                      getattr(self.hf.config, "pad_token_id", None), getattr(self.hf.config, "eos_token_id", None)]
        for pad in candidates:
            pad = pad[0] if isinstance(pad, list) and pad else pad
            if isinstance(pad, int) and (self.vocab_size is None or 0 <= pad < self.vocab_size):
                return pad
        return 0

    def token_strings(self, ids: list[int]) -> list[str]:
        """Display strings for token ids (the decoded text of each token; `#id` without a tokenizer).

        Args:
            ids: token ids.

        Returns:
            One string per id.
        """
        if self.tokenizer is None:
            return [f"#{i}" for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    # running

    def forward(self, prompt: Prompt, *, prepend_bos: bool = False, grad: bool = False) -> Any:
        """Run the wrapped model on a prompt, with whatever edits are active in this context.

        Args:
            prompt: anything `encode` reads (text, texts, token ids, a Batch, a tokenizer's output).
            prepend_bos: put the model's BOS first.
            grad: keep the autograd graph (for gradients through edits, e.g. attribution patching).

        Returns:
            The HF model output (logits for LMs).

        Raises:
            PromptError: an empty, malformed or too long prompt.
        """
        batch = self.encode(prompt, prepend_bos=prepend_bos)
        with torch.set_grad_enabled(grad):
            return self.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    @contextmanager
    def capturing(self, *, layers: Iterable[int] | None = None, with_z: bool = False, keep: bool = True,
                  callback: Callable[[LayerRecord], None] | None = None) -> Iterator[Capture]:
        """Record the given layers of every forward inside the block; yields the Capture.

        For loops that make their own forwards (a decode loop over a KV cache, `forward_cached`): each layer's
        latest LayerRecord lands in `capture.records` (keep=True), and/or `callback(record)` runs as the forward
        reaches the layer (reductions that drop the record). `run` and `stats` are this plus one forward.

        Args:
            layers: layer indices to record (None: all).
            with_z: also record each layer's per-head output z `[B, Q, H, D]`.
            keep: keep each layer's latest record in `capture.records`.
            callback: called with each LayerRecord as it is made.

        Yields:
            The Capture (`records`: layer -> its latest LayerRecord when keep=True).

        Raises:
            HeadIndexError: a layer out of range.
        """
        wanted = None if layers is None else frozenset(layers)
        if wanted is not None:
            self.check_layers(wanted)
        capture = self._capture(layers=wanted, with_z=with_z, keep=keep, callback=callback)
        with activate(self._owner, capture=capture):
            yield capture

    def forward_cached(self, ids: torch.Tensor, cache: Any = None, *, keep_keys: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward of ids `[1, T]` on a KV cache (None: a fresh one); returns the last logits `[V]` and the cache.

        The one place that knows the cache keyword (`cache`, named `past_key_values` before transformers 5.x).
        Edits and captures active in this context apply; gradients follow torch's grad mode.

        Args:
            ids: token ids `[1, T]` on the model's device (the new tokens only, when `cache` holds a prefix).
            cache: the cache returned by the previous call, or None for a fresh one.
            keep_keys: a fresh cache of a model with recurrent (linear) layers also keeps their keys, so that decode
                steps' pattern rows exist (retrieval scoring, pattern-reading edits); other models' caches keep them
                anyway.

        Returns:
            (logits `[V]` at the last position, the updated cache).
        """
        params = inspect.signature(self.hf.forward).parameters
        if cache is None and keep_keys and callable(getattr(self.hf, "headlab_cache", None)):
            cache = self.hf.headlab_cache(keep_keys=True)
        kwargs: dict[str, Any] = {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {})}
        if cache is not None:
            kwargs["cache" if "cache" in params else "past_key_values"] = cache
        out = self.hf(input_ids=ids, **kwargs)
        return out.logits[0, -1], output_cache(out)

    def layer_inputs(self, prompt: Prompt, *, prepend_bos: bool = False, grad: bool = False) -> LayerInputs:
        """One forward recording the residual stream entering each layer and the layer's call.

        `LayerInputs.resume(start, copies=n)` then reruns only the layers from `start` on (exact patching of a head
        reruns what is downstream of it). Edits active in this context apply to the recording forward.

        Args:
            prompt: anything `encode` reads.
            prepend_bos: put the model's BOS first.
            grad: keep the autograd graph of the recording forward.

        Returns:
            A LayerInputs: the batch, the residual stream entering each layer `[B, T, d]`, each layer's call and the
            logits.

        Raises:
            PromptError: an empty, malformed or too long prompt.
            UnsupportedModelError: a model whose layers cannot be found (not ModuleList entries) or that has no
                final norm headlab knows.
        """
        return record_layer_inputs(self, self.encode(prompt, prepend_bos=prepend_bos), grad=grad)

    def run(self, prompt: Prompt, *, heads: Iterable[HeadRef] | None = None, layers: Iterable[int] | None = None,
            prepend_bos: bool = False, with_z: bool = False) -> Run:
        """Run a prompt and capture q, k, v (and z) of the layers holding `heads` (or `layers`; all when neither).

        Patterns are computed later, on demand, from the captured post-RoPE q and k (`Run.pattern`), so any
        backend works. Edits active in this context apply.

        Args:
            prompt: anything `encode` reads (text, texts, token ids, a Batch, a tokenizer's output).
            heads: heads whose layers to capture (HeadRefs, (layer, head) pairs or "L3H1" strings).
            layers: further layers to capture.
            prepend_bos: put the model's BOS first.
            with_z: also capture each layer's per-head output z.

        Returns:
            A Run: `pattern(head)` `[B, Q, S]`, `q / k / v(head)`, `tokens(i)`, `logits`, `figure(head)`.

        Raises:
            HeadIndexError: a head or layer out of range.
            PromptError: an empty, malformed or too long prompt.
        """
        refs = as_heads(heads) if heads is not None else []
        self.check_heads(refs)
        wanted = {r.layer for r in refs} | set(layers or [])
        self.check_layers(wanted)
        capture = self._capture(layers=frozenset(wanted) if wanted else None, with_z=with_z)
        batch = self.encode(prompt, prepend_bos=prepend_bos)
        with activate(self._owner, capture=capture), torch.no_grad():
            output = self.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return Run(model=self, batch=batch, output=output, records=capture.records, heads=refs)

    def stats(self, prompt: Prompt, *, heads: Iterable[HeadRef] | None = None, layers: Iterable[int] | None = None,
              topk: int = 1, key_sets: Any = None, impl: str = "auto", prepend_bos: bool = False,
              reducer: Any = None, statistics: str | Iterable[str] = "all", route: str = "auto") -> "StatsRun":
        """Streaming per-head statistics of the layers holding `heads` (or `layers`; all when neither).

        Each layer's q and k are reduced to HeadStats (Triton on CUDA, the torch reference elsewhere;
        `impl` overrides) as the forward reaches it and then dropped: memory stays O(T) per head.

        Args:
            prompt: anything `encode` reads.
            heads: heads whose layers to reduce.
            layers: further layers to reduce (all layers when neither is given).
            topk: how many top keys per query to keep.
            key_sets: bool `[K, B, S]` or {name: bool `[B, S]`}: the attention mass on each set per query.
            impl: "auto", "triton" or "torch" (the chunked torch reference).
            prepend_bos: put the model's BOS first.
            reducer: optional `f(record, stats) -> Any` called per layer; its results land in `.extra`.
            statistics: "all" (every statistic; with `impl="auto"` they come with the layer's output from the
                one-sweep kernel on the CPU, the Triton rows pass on CUDA; elsewhere — or where that is not built —
                from q and k after the layer ran, the "full route" `impl` chooses), or only those named — "lse",
                or a set of "lse", "entropy", "key_sets", "received", "topk" (lse always comes along) — which then
                ride on the attention call itself where a fused CPU route applies (`attention_with_stats`): the lse
                (and masses on a few keys) from ATen's flash kernel that sdpa runs, so the output stays identical;
                anything more from headlab's compiled kernel, which computes the output and all of them in one
                sweep; where that is not built, entropy and key-set masses as extra value columns of the flash call
                and received mass from one more flash call with the roles swapped. Elsewhere (and "topk" without
                the compiled kernel) everything is computed as for "all". Statistics not asked for are NaN / empty.
                `StatsRun.paths` says which route each layer took.
            route: for named statistics, the fused route: "auto" (as above; on CUDA "triton"), "flash" (ATen's flash
                kernel only), "kernel" (the compiled CPU kernel only) or "triton" (the Triton rows pass with the
                output, on CUDA; on the CPU only under TRITON_INTERPRET=1); where the route named does not apply,
                the full route runs.

        Returns:
            A StatsRun: per-layer HeadStats (top-k keys, log-sum-exp, entropy, key-set mass, received attention).

        Raises:
            HeadIndexError: a head or layer out of range.
            PromptError: an empty, malformed or too long prompt.
        """
        from headlab.stats import StatsRun, fused_stats, layer_stats, stack_key_sets
        from headlab_kernels.head_stats import resolve_impl
        from headlab_kernels.head_stats.fused import ROUTES

        fused_names = ("lse", "entropy", "key_sets", "received", "topk")
        asked = {statistics} if isinstance(statistics, str) else set(statistics)
        if asked != {"all"} and (not asked or not asked <= set(fused_names)):
            raise ValueError(f"statistics must be 'all' or a set of {', '.join(fused_names)}; got {statistics!r}")
        if route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}; got {route!r}")
        if "key_sets" in asked and key_sets is None:
            raise ValueError("statistics names 'key_sets' but no key_sets were given")

        refs = as_heads(heads) if heads is not None else []
        self.check_heads(refs)
        wanted = {r.layer for r in refs} | set(layers or [])
        self.check_layers(wanted)
        batch = self.encode(prompt, prepend_bos=prepend_bos)
        result = StatsRun(model=self, batch=batch, output=None, layers={})

        if asked == {"all"} and impl == "auto":  # every statistic: from the one-sweep kernel where it runs
            asked = {"entropy", "received", "topk"} | ({"key_sets"} if key_sets is not None else set())
        fused = asked != {"all"} and (key_sets is None or "key_sets" in asked)
        sets, names = (stack_key_sets(key_sets, batch) if fused and key_sets is not None else (None, ()))

        def reduce(record) -> None:
            if fused and record.fused is not None:
                st = fused_stats(record, batch, names)
                prefix = "fused" if record.fused_route == "flash" else record.fused_route
                path = prefix + "-" + "+".join(n for n in fused_names if n == "lse" or n in asked)
            else:
                st = layer_stats(self, record, batch, topk=topk, key_sets=key_sets, impl=impl)
                path = "implicit" if record.linear else resolve_impl(impl, record.q)
            result.layers[record.layer] = st
            result.paths[record.layer] = path
            if reducer is not None:
                result.extra[record.layer] = reducer(record, st)

        capture = self._capture(layers=frozenset(wanted) if wanted else None, keep=False, callback=reduce, with_lse=fused,
                          fused_stats=frozenset(asked - {"lse", "all"}), topk=topk, route=route, key_sets=sets,
                          query_mask=batch.attention_mask.bool())
        with activate(self._owner, capture=capture), torch.no_grad():
            result.output = self.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return result

    def token_losses(self, prompt: Prompt, *, prepend_bos: bool = False, grad: bool = False) -> torch.Tensor:
        """Next-token cross-entropy `[B, T-1]` (position t predicts token t+1); NaN where the target is padding.

        Args:
            prompt: anything `encode` reads.
            prepend_bos: put the model's BOS first.
            grad: keep the autograd graph.

        Returns:
            float32 `[B, T-1]` losses in nats.

        Raises:
            PromptError: the model has no LM head, or a bad prompt.
        """
        self._require_lm("token_losses")
        batch = self.encode(prompt, prepend_bos=prepend_bos)
        with torch.set_grad_enabled(grad):
            logits = self.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return next_token_losses(logits, batch.input_ids, batch.attention_mask)

    def loss(self, prompt: Prompt, *, prepend_bos: bool = False, grad: bool = False) -> torch.Tensor:
        """Mean next-token cross-entropy over the real (unpadded) targets (a scalar; see `token_losses`).

        Args:
            prompt: anything `encode` reads.
            prepend_bos: put the model's BOS first.
            grad: keep the autograd graph (to backpropagate the loss).

        Returns:
            A scalar tensor, in nats.

        Raises:
            PromptError: the model has no LM head, or a bad prompt.
        """
        losses = self.token_losses(prompt, prepend_bos=prepend_bos, grad=grad)
        return losses.nanmean()

    def _require_lm(self, what: str) -> None:
        if not self.is_lm:
            raise PromptError(f"{self.name} ({type(self.hf).__name__}) has no language-model head: {what} is "
                              "undefined for it; use run(...) for its patterns and hidden states")


def _pad(seqs: list[torch.Tensor], pad_id: int) -> Batch:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return Batch(ids, mask)
