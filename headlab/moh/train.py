"""Train a MoH router on a frozen pretrained model: only the router's parameters learn, on offline text.

The router is a `LearnedRouter` (standardised query norms + W x + b, W and b zero at the start, so step 0 is the
training-free router). Gates are straight-through: binary top-k forward, the router's softmax backward. The loss is
the next-token loss plus `balance` × the mean over routed layers of MoH's load-balance term L_b = Σ_i P_i f_i.
Checkpoints (router weights, AdamW state, the loss curve) are written every `checkpoint_every` steps, so an
interrupted run resumes bit for bit where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from headlab.edits import edit
from headlab.edits.moh import LearnedRouter, MoH
from headlab.errors import HeadlabError
from headlab.inputs import windows
from headlab.models.head_model import HeadModel
from headlab.paths import TEXT_DIR
from headlab.results import load_tensors, params_dict, read_json, save_tensors, write_json

TRAIN_TEXT = TEXT_DIR / "kjv-genesis-1-15.txt"
ROUTER_FILE = "router.safetensors"
STATE_FILE = "router.json"


@dataclass(frozen=True, kw_only=True)
class RouterParams:
    """How a router is trained.

    Attributes:
        steps: optimizer steps (AdamW on the router only).
        batch: windows per step.
        seq_len: tokens per window.
        lr: the constant learning rate.
        balance: weight of the load-balance term (MoH: 0.01).
        text: the training text (a file of the offline corpus; held-out evaluation uses another).
        seed: seed of the batches.
        checkpoint_every: steps between checkpoints.

    Raises:
        HeadlabError: a count < 1 or a learning rate <= 0.
    """

    steps: int = 100
    batch: int = 4
    seq_len: int = 128
    lr: float = 3e-3
    balance: float = 0.01
    text: str = str(TRAIN_TEXT)
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise HeadlabError(f"RouterParams.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise HeadlabError(f"RouterParams.lr must be > 0, got {self.lr}")


@contextmanager
def frozen(model: HeadModel) -> Iterator[None]:
    """The model's parameters do not require grad inside the block (restored exactly on exit, also on error).

    Args:
        model: the HeadModel whose parameters to freeze.

    Yields:
        Nothing (None).
    """
    params = list(model.hf.parameters())
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def text_windows(model: HeadModel, path: str | Path, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows `[n, seq_len]` of a text file's tokens.

    Args:
        model: the model whose tokenizer to use.
        path: a UTF-8 text file.
        seq_len: tokens per window.

    Returns:
        A LongTensor `[n, seq_len]` (the remainder is dropped).

    Raises:
        HeadlabError: no such file, no tokenizer, seq_len longer than the context, or fewer tokens than one window.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadlabError(f"training text {path} does not exist")
    if model.tokenizer is None:
        raise HeadlabError(f"{model.name} has no tokenizer: a router is trained on text")
    ids = torch.tensor(model.tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"])
    if model.max_context is not None and seq_len > model.max_context:
        raise HeadlabError(f"seq_len {seq_len} is longer than {model.name}'s context of {model.max_context}")
    if len(ids) < seq_len:
        raise HeadlabError(f"{path} has {len(ids)} tokens, fewer than one window of {seq_len}")
    return windows(ids, seq_len)


def new_router(model: HeadModel, moh: MoH) -> LearnedRouter:
    """A zero LearnedRouter for `moh`'s routed layers of `model` (the training-free router until trained).

    Args:
        model: the HeadModel.
        moh: the MoH edit whose geometry (shared heads, layers) the router serves.

    Returns:
        A LearnedRouter with zero weight and bias.

    Raises:
        EditError: no routed head left.
        HeadIndexError: a layer out of range.
    """
    return LearnedRouter(moh.routed_layers(model), model.n_heads - moh.n_shared(model), model.hf.config.hidden_size)


def load_router(folder: str | Path) -> tuple[LearnedRouter, dict[str, Any]]:
    """A router saved by `train_router` and its state (params, MoH settings, curve, step).

    Args:
        folder: the folder `train_router(..., out=folder)` wrote.

    Returns:
        (the LearnedRouter, its state dict).

    Raises:
        ResultError: router.json or its weights missing or unreadable.
    """
    folder = Path(folder)
    state = read_json(folder / STATE_FILE)
    tensors = load_tensors(folder / ROUTER_FILE)
    router = LearnedRouter(state["layers"], state["n_routed"], state["hidden_size"])
    router.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
    return router, state


def _save(folder: Path, router: LearnedRouter, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tensors = {"weight": router.weight.detach().clone(), "bias": router.bias.detach().clone()}
    for i, p in enumerate(router.parameters()):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"opt.{i}.{key}"] = st[key].detach().clone()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).clone()
    save_tensors(folder / ROUTER_FILE, tensors)
    write_json(folder / STATE_FILE, state)  # the commit marker: written after the weights


def _restore(folder: Path, router: LearnedRouter, opt: torch.optim.Optimizer) -> None:
    tensors = load_tensors(folder / ROUTER_FILE)
    with torch.no_grad():
        router.weight.copy_(tensors["weight"])
        router.bias.copy_(tensors["bias"])
    for i, p in enumerate(router.parameters()):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"opt.{i}.step"].reshape(()).clone(),
                            "exp_avg": tensors[f"opt.{i}.exp_avg"], "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"]}


def train_router(model: HeadModel, moh: MoH, params: RouterParams = RouterParams(), *, out: str | Path | None = None,
                 progress: bool = True) -> tuple[LearnedRouter, dict[str, Any]]:
    """Train a router for `moh`'s geometry (shared heads, k, layers) on `params.text`; the model stays as it was.

    With `out`, checkpoints go there and a finished or interrupted run there is resumed (its settings must match).

    Args:
        model: the frozen HeadModel (its parameters get no gradient and are restored as they were).
        moh: the MoH edit whose geometry the router serves (its router is replaced by the trained one).
        params: steps, batch, window length, learning rate, load-balance weight, text and seed.
        out: a checkpoint folder (router.safetensors with the AdamW state, router.json).
        progress: show a progress bar.

    Returns:
        (the LearnedRouter, its state: settings, step, curve of [step, task loss, mean L_b], seconds).

    Raises:
        HeadlabError: an `out` holding a router trained with other settings, or a bad training text.
    """
    data = text_windows(model, params.text, params.seq_len)
    router = new_router(model, moh)
    opt = torch.optim.AdamW(router.parameters(), lr=params.lr, weight_decay=0.0)
    k, shared = moh.k(model), moh.n_shared(model)
    identity = {"params": params_dict(params), "shared": shared, "k": k, "layers": list(router.layers),
                "n_routed": router.n_routed, "hidden_size": router.hidden_size, "model": model.name}
    state: dict[str, Any] = {**identity, "step": 0, "curve": [], "seconds": 0.0}
    folder = Path(out) if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        old = read_json(folder / STATE_FILE, missing_ok=True)
        if old is not None:
            mismatch = [key for key in identity if old.get(key) != identity[key]]
            if mismatch:
                raise HeadlabError(f"{folder} holds a router trained with other settings ({', '.join(mismatch)}): "
                                   "use another --out")
            _restore(folder, router, opt)
            state = old
    balance_terms: list[torch.Tensor] = []

    def collect(layer: int, scores: torch.Tensor, gates: torch.Tensor) -> None:
        p = torch.softmax(scores.float(), dim=-1).reshape(-1, scores.shape[-1])  # [tokens, h_r]
        f = (gates[..., shared:].detach() != 0).float().reshape(-1, scores.shape[-1])
        balance_terms.append((p.mean(0) * f.mean(0)).sum())

    routed = dataclasses.replace(moh, router=router, straight_through=True, on_route=collect)
    start = time.perf_counter() - float(state["seconds"])
    bar = tqdm(total=params.steps, initial=state["step"], desc=f"router k={k}", disable=not progress)
    with frozen(model):
        while state["step"] < params.steps:
            step = state["step"]
            gen = torch.Generator().manual_seed(params.seed * 1_000_003 + step)
            rows = torch.randint(0, len(data), (params.batch,), generator=gen)
            balance_terms.clear()
            with edit(model, routed):
                task = model.loss(data[rows], grad=True)
            lb = torch.stack(balance_terms).mean() if balance_terms else task.new_zeros(())
            loss = task + params.balance * lb
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] = step + 1
            task, lb = float(task.detach()), float(lb.detach())
            state["curve"].append([step, round(task, 5), round(lb, 5)])
            state["seconds"] = round(time.perf_counter() - start, 2)
            bar.update(1)
            bar.set_postfix(loss=f"{task:.3f}", L_b=f"{lb:.3f}")
            if folder is not None and (state["step"] % params.checkpoint_every == 0 or state["step"] == params.steps):
                _save(folder, router, opt, state)
    bar.close()
    return router, state
