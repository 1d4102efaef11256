"""Linearize a pretrained Llama-family model head by head: Hedgehog feature maps trained by attention transfer.

The base model stays frozen. One forward of the base over training windows records every layer's post-RoPE q, k
and v (its own inputs, as Hedgehog and LoLCATs train layer by layer); then, layer by layer, each head's feature map
φ_h is trained so that its linear attention matches the head's softmax attention: Hedgehog's soft cross-entropy
between the softmax pattern and the linear pattern, plus the relative squared error of the outputs (LoLCATs'
attention-output transfer). Layers are checkpointed one by one (`layers/layer_XX.safetensors` + a JSON line of
their losses), so an interrupted build resumes at the next layer; the end is an HF folder (`model/`, with the
tokenizer) that `hl.load` opens.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from headlab.errors import HeadlabError
from headlab.inputs import windows
from headlab.models.head_model import HeadModel
from headlab.paths import KJV_GENESIS
from headlab.results import append_jsonl, load_tensors, params_dict, read_json, read_jsonl, save_tensors, write_json

STAMP = "headlab_linearize.json"


@dataclass(frozen=True, kw_only=True)
class TransferParams:
    """How the feature maps are trained.

    Attributes:
        feature_dim: F per sign (Hedgehog: features [softmax(xW + b), softmax(−(xW + b))], 2F wide).
        text: training text (offline); windows × seq_len tokens of it, each after BOS.
        windows: training windows.
        seq_len: tokens per window (after BOS).
        steps: AdamW steps per layer (all heads of the layer at once).
        lr: the learning rate.
        pattern_weight: weight of the pattern cross-entropy.
        output_weight: weight of the relative output error.
        seed: torch's seed while training (the start, the identity map, has no randomness).

    Raises:
        HeadlabError: feature_dim, windows, seq_len or steps < 1.
    """

    feature_dim: int = 64
    text: str = str(KJV_GENESIS)
    windows: int = 24
    seq_len: int = 128
    steps: int = 200
    lr: float = 1e-2
    pattern_weight: float = 1.0
    output_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("feature_dim", "windows", "seq_len", "steps"):
            if getattr(self, name) < 1:
                raise HeadlabError(f"TransferParams.{name} must be >= 1, got {getattr(self, name)}")


def text_tokens(model: HeadModel, path: str | Path, n: int, seq_len: int) -> torch.Tensor:
    """`[n, 1 + seq_len]` token windows of a text file, each after BOS.

    Args:
        model: the model whose tokenizer and BOS (else pad) id to use.
        path: a UTF-8 text file.
        n: the number of windows.
        seq_len: tokens per window (before BOS).

    Returns:
        A LongTensor `[n, 1 + seq_len]`.

    Raises:
        HeadlabError: no such file, no tokenizer, or fewer than n · seq_len tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadlabError(f"text {path} does not exist")
    if model.tokenizer is None:
        raise HeadlabError(f"{model.name} has no tokenizer")
    ids = torch.tensor(model.tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False,
                                       verbose=False)["input_ids"])
    if len(ids) < n * seq_len:
        raise HeadlabError(f"{path} has {len(ids)} tokens, fewer than {n} windows × {seq_len}")
    bos = model.bos_id if model.bos_id is not None else model.pad_id
    return windows(ids, seq_len, count=n, bos=bos)


def record_layers(model: HeadModel, tokens: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
    """Every layer's post-RoPE q `[N, H, T, D]`, k and v `[N, G, T, D]` on `tokens` (the base model's forward).

    Args:
        model: the base HeadModel.
        tokens: token ids `[N, T]`.

    Returns:
        {layer: (q, k, v)} in float32.
    """
    run = model.run(tokens)
    return {layer: (rec.q.float(), rec.k.float(), rec.v.float()) for layer, rec in run.records.items()}


def softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """Causal softmax patterns `[N, H, T, T]` and outputs `[N, H, T, D]` (k, v repeated per query head).

    Args:
        q: `[N, H, T, D]`.
        k: `[N, G, T, D]`.
        v: `[N, G, T, D]`.
        scale: the softmax scale.

    Returns:
        (pattern `[N, H, T, T]`, output `[N, H, T, D]`, k and v repeated per query head `[N, H, T, D]`).
    """
    T = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = (q @ kk.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return p, p @ vv, kk, vv


def linear_pattern(q: torch.Tensor, kk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """Hedgehog's causal normalised pattern `[N, H, T, T]` with maps `weight` `[H, D, F]`, `bias` `[H, F]`.

    Args:
        q: queries `[N, H, T, D]`.
        kk: keys repeated per query head `[N, H, T, D]`.
        weight: `[H, D, F]` feature-map weights.
        bias: `[H, F]` feature-map biases.
        eps: added to each row's normaliser.

    Returns:
        `[N, H, T, T]`: φ(q)·φ(k) over the causal prefix, each row divided by its sum + eps.
    """
    from headlab.models.linearized import hedgehog_features

    T = q.shape[2]
    fq, fk = hedgehog_features(q, weight, bias), hedgehog_features(kk, weight, bias)
    a = (fq @ fk.transpose(-1, -2)) * torch.ones(T, T, device=q.device).tril()
    return a / (a.sum(-1, keepdim=True) + eps)


def head_losses(p: torch.Tensor, out: torch.Tensor, lp: torch.Tensor, vv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head `[H]`: the pattern cross-entropy excess and the relative output error.

    Args:
        p: softmax patterns `[N, H, T, T]`.
        out: softmax outputs `[N, H, T, D]`.
        lp: linear patterns `[N, H, T, T]`.
        vv: values per query head `[N, H, T, D]`.

    Returns:
        {"kl": KL(p‖lp) `[H]`, nats per row; "rel_error": ‖lp v − p v‖² / ‖p v‖² `[H]`}.
    """
    kl = (p * (p.clamp_min(1e-12).log() - lp.clamp_min(1e-12).log())).sum(-1).mean((0, 2))
    lout = lp @ vv
    rel = ((lout - out) ** 2).sum((0, 2, 3)) / (out ** 2).sum((0, 2, 3)).clamp_min(1e-12)
    return {"kl": kl, "rel_error": rel}


def train_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: TransferParams,
                *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """Train the feature maps of one layer's heads by attention transfer, from the identity map.

    Args:
        q: the layer's post-RoPE queries `[N, H, T, D]`.
        k: its keys `[N, G, T, D]`.
        v: its values `[N, G, T, D]`.
        scale: the softmax scale.
        params: steps, learning rate, feature width and loss weights.
        eps: the linear pattern's normaliser epsilon.

    Returns:
        (weight `[H, D, F]`, bias `[H, F]`, curve of [step, mean KL, mean relative output error] every 25 steps).
    """
    H, D = q.shape[1], q.shape[3]
    F = params.feature_dim
    weight = torch.zeros(H, D, F)
    n = min(D, F)
    weight[:, range(n), range(n)] = 1.0
    bias = torch.zeros(H, F)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    p, out, kk, vv = softmax_reference(q, k, v, scale)
    opt = torch.optim.AdamW([weight, bias], lr=params.lr, weight_decay=0.0)
    curve = []
    for step in range(params.steps):
        lp = linear_pattern(q, kk, weight, bias, eps)
        losses = head_losses(p, out, lp, vv)
        loss = params.pattern_weight * losses["kl"].mean() + params.output_weight * losses["rel_error"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == params.steps - 1:
            curve.append([step, round(float(losses["kl"].detach().mean()), 5),
                          round(float(losses["rel_error"].detach().mean()), 5)])
    return weight.detach(), bias.detach(), curve


def build_linearized(model: HeadModel, out: str | Path, params: TransferParams = TransferParams(), *,
                     tokens: torch.Tensor | None = None, progress: bool = True) -> Path:
    """Linearize `model` (a Llama-family HeadModel) into `out/model` (an HF folder); resumable layer by layer.

    Args:
        model: the base HeadModel (Llama, Mistral or Qwen2; every layer softmax).
        out: the build folder: `layers/` (one checkpoint per layer), `layers.jsonl` (each layer's curve and seconds),
            build.json (the settings), and at the end `model/` with its `STAMP`.
        params: feature width, text, steps and loss weights.
        tokens: `[N, T]` ids to train on instead of `params.text` (models without a tokenizer).
        progress: show a progress bar.

    Returns:
        The model folder `out/model` (an HF folder `hl.load` opens).

    Raises:
        HeadlabError: not a softmax Llama-family model, an `out` holding a build with other settings, or a bad
            training text.
    """
    from headlab.models.linearized import from_base

    if model.spec.family not in ("llama", "mistral", "qwen2"):
        raise HeadlabError(f"linearization needs a Llama-family model with RoPE; {model.name} is "
                           f"{model.spec.family!r}")
    if any(kind != "softmax" for kind in model.layer_kinds):
        raise HeadlabError(f"{model.name} is not a softmax model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"params": params_dict(params), "base": model.name,
                "tokens": None if tokens is None else list(tokens.shape)}
    old = read_json(out / "build.json", missing_ok=True)
    if old is not None and old.get("identity") != identity:
        raise HeadlabError(f"{out} holds a linearization with other settings: use another --out")
    write_json(out / "build.json", {"identity": identity})
    folder = out / "model"
    if (folder / STAMP).is_file():
        return folder
    layers_dir = out / "layers"
    layers_dir.mkdir(exist_ok=True)
    done = {r["layer"] for r in read_jsonl(out / "layers.jsonl") if (layers_dir / f"layer_{r['layer']:02d}.safetensors").is_file()}
    todo = [layer for layer in range(model.n_layers) if layer not in done]
    if todo:
        if tokens is None:
            tokens = text_tokens(model, params.text, params.windows, params.seq_len)
        with torch.no_grad():
            records = record_layers(model, tokens)
        scale = model.head_dim ** -0.5
        bar = tqdm(total=model.n_layers, initial=len(done), desc="attention transfer", disable=not progress)
        torch.manual_seed(params.seed)
        for layer in todo:
            start = time.perf_counter()
            q, k, v = records[layer]
            weight, bias, curve = train_layer(q, k, v, scale, params)
            save_tensors(layers_dir / f"layer_{layer:02d}.safetensors", {"weight": weight, "bias": bias})
            append_jsonl(out / "layers.jsonl", {"layer": layer, "curve": curve,
                                                "seconds": round(time.perf_counter() - start, 2)})
            bar.update(1)
            bar.set_postfix(kl=curve[-1][1], rel=curve[-1][2])
        bar.close()
    lin = from_base(model.hf, feature_dim=params.feature_dim, base_model=model.name)
    with torch.no_grad():
        for layer, block in enumerate(lin.model.layers):
            maps = load_tensors(layers_dir / f"layer_{layer:02d}.safetensors")
            block.self_attn.feature_map.copy_(maps["weight"])
            block.self_attn.feature_bias.copy_(maps["bias"])
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lin.save_pretrained(tmp)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(tmp)
    rows = read_jsonl(out / "layers.jsonl")
    write_json(tmp / STAMP, {"base": model.name, "params": params_dict(params),
                             "seconds": round(sum(r["seconds"] for r in rows), 1)})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def build_info(out: str | Path) -> dict[str, Any]:
    """The stamp and per-layer curves of a build folder.

    Args:
        out: the folder `build_linearized` wrote.

    Returns:
        {"stamp": the model folder's STAMP (base, params, seconds), "layers": the rows of layers.jsonl}.
    """
    out = Path(out)
    return {"stamp": json.loads((out / "model" / STAMP).read_text()), "layers": read_jsonl(out / "layers.jsonl")}
