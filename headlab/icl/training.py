"""Train a one-layer attention model on in-context regression, recording its heads at checkpoints.

At every checkpoint the trainer records the mean training MSE since the last one, the MSE on a
fixed evaluation set (against the noisy and the clean target), every head's KQ `[H, D, D]` and
OV `[H, D]`, and the predictions on fixed probe prompts `[P]`. With `out`, each checkpoint
also writes `checkpoint.safetensors` (weights, optimiser state, history; the settings as JSON
metadata) atomically and `run.json` (settings, meta, scalar history) for reading; calling
`train` again with the same settings continues from the last checkpoint. The batch of step t
is drawn from a generator seeded by (seed, t), so an interrupted and resumed run is bit-identical
to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from headlab.errors import HeadlabError
from headlab.icl.models import Kind, ModelParams, build, predict
from headlab.icl.tasks import Prompts, TaskParams, sample
from headlab.results import save_tensors, write_json

CHECKPOINT_FILE = "checkpoint.safetensors"
RUN_FILE = "run.json"
_PROMPT_FIELDS = ("x", "y", "xq", "yq", "w")


class CheckpointMismatchError(HeadlabError, ValueError):
    """A checkpoint folder that holds a run with other settings than those asked for."""


@dataclass(frozen=True, kw_only=True)
class TrainParams:
    """Optimisation and recording settings.

    Attributes:
        steps: optimiser steps, each on a fresh batch.
        batch: prompts per step (He et al.: 256).
        lr: learning rate (He et al.: Adam 1e-3).
        optimizer: "adam" (He et al.) or "sgd" (a discretised gradient flow, ZFB).
        schedule: "constant", or "cosine" decay to 0 over `steps`.
        loss: "mse" (He et al.'s MSELoss) or "half_mse" (ZFB's ½ squared error).
        checkpoint_every: steps between checkpoints (the last step is always one).
        eval_batch: size of the fixed evaluation set.
        probes: number of fixed probe prompts whose predictions are recorded.
        seed: seed of the data stream, the evaluation set and the probes.
    """

    steps: int = 5000
    batch: int = 256
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["constant", "cosine"] = "constant"
    loss: Literal["mse", "half_mse"] = "mse"
    checkpoint_every: int = 250
    eval_batch: int = 4096
    probes: int = 32
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based).

        Args:
            step: the step.

        Returns:
            `lr`, or its cosine decay at `step / steps`.
        """
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
        return self.lr

    @classmethod
    def for_kind(cls, kind: Kind, **changes) -> "TrainParams":
        """The defaults for a model kind.

        ZFB's LSA gets SGD (a discretised flow) on ½MSE with a cosine decay and large batches, so that its product
        settles to ~0.2%; the heads get He et al.'s Adam 1e-3.

        Args:
            kind: "lsa", "softmax", "linear" or "linear_mean".
            changes: fields to override.

        Returns:
            The TrainParams.
        """
        if kind == "lsa":
            base = dict(steps=2000, batch=4096, lr=0.05, optimizer="sgd", schedule="cosine", loss="half_mse",
                        checkpoint_every=100)
        else:
            base = dict(steps=6000, batch=256, lr=1e-3, optimizer="adam", schedule="constant", loss="mse",
                        checkpoint_every=250)
        return cls(**(base | changes))


@dataclass
class ICLRun:
    """A trained model with its settings and its history over checkpoints.

    Attributes:
        task: the prompt distribution.
        model_params: the model's settings.
        train_params: the training settings.
        model: the trained LSA or HeadAttention.
        history: `steps` [C], `train_mse` [C] (NaN at step 0), `eval_mse` [C], `eval_clean_mse` [C],
            `kq` [C, H, D, D], `ov` [C, H, D], `probe_pred` [C, P].
        probes: the fixed probe prompts (P of them).
        meta: facts about the run (versions, time, seconds trained, resumes).
    """

    task: TaskParams
    model_params: ModelParams
    train_params: TrainParams
    model: nn.Module
    history: dict[str, torch.Tensor]
    probes: Prompts
    meta: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        """The step of the last checkpoint (0 before any)."""
        return int(self.history["steps"][-1]) if len(self.history["steps"]) else 0

    def settings(self) -> dict:
        """The three params dataclasses as one JSON-ready dict.

        Returns:
            {"task", "model", "train"}.
        """
        return {"task": dataclasses.asdict(self.task), "model": dataclasses.asdict(self.model_params),
                "train": dataclasses.asdict(self.train_params)}

    def to_json(self) -> dict:
        """The run as `run.json` holds it.

        Returns:
            {"analysis", "model", "task", "model", "train", "meta", "history" (the scalar curves), "patterns"
            (`pattern_summary` at the last checkpoint)}.
        """
        from headlab.icl.theory import pattern_summary

        scalars = {k: [None if math.isnan(v) else v for v in self.history[k].tolist()]
                   for k in ("steps", "train_mse", "eval_mse", "eval_clean_mse")}
        final = pattern_summary(self.history["kq"][-1], self.history["ov"][-1]) if self.step else {}
        return {"analysis": "icl-regression", "model": self.model_params.name, **self.settings(),
                "meta": self.meta, "history": scalars, "patterns": final}

    def save(self, folder: str | Path, optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Write `checkpoint.safetensors` (atomically) and `run.json` into `folder`.

        Args:
            folder: the folder (created if needed).
            optimizer: its state is saved too, so that `train` resumes exactly.

        Returns:
            The folder, as a Path.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        tensors |= {f"history.{k}": v.contiguous() for k, v in self.history.items()}
        tensors |= {f"probes.{k}": getattr(self.probes, k).contiguous() for k in _PROMPT_FIELDS}
        groups = []
        if optimizer is not None:
            sd = optimizer.state_dict()
            for i, st in sd["state"].items():
                tensors |= {f"opt.{i}.{k}": torch.as_tensor(v).contiguous() for k, v in st.items()}
            groups = sd["param_groups"]
        header = {"settings": self.settings(), "meta": self.meta, "param_groups": groups}
        save_tensors(folder / CHECKPOINT_FILE, tensors, metadata={"headlab": json.dumps(header, default=str)})
        write_json(folder / RUN_FILE, self.to_json())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ICLRun":
        """The run saved in `folder` (its model rebuilt and loaded).

        Args:
            folder: a folder `save` wrote.

        Returns:
            The ICLRun.
        """
        run, _ = _load(Path(folder))
        return run


def _params(settings: dict) -> tuple[TaskParams, ModelParams, TrainParams]:
    task = dict(settings["task"])
    if task.get("cov_diag") is not None:
        task["cov_diag"] = tuple(task["cov_diag"])
    return TaskParams(**task), ModelParams(**settings["model"]), TrainParams(**settings["train"])


def _load(folder: Path) -> tuple[ICLRun, dict]:
    from safetensors import safe_open

    path = folder / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["headlab"])
    tensors = load_file(str(path))
    task, model_params, train_params = _params(header["settings"])
    model = build(model_params, task)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    history = {k[8:]: v for k, v in tensors.items() if k.startswith("history.")}
    probes = Prompts(**{k: tensors[f"probes.{k}"] for k in _PROMPT_FIELDS})
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    run = ICLRun(task=task, model_params=model_params, train_params=train_params, model=model,
                 history=history, probes=probes, meta=header["meta"])
    return run, {"state": opt_state, "param_groups": header["param_groups"]}


def _data_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2 ** 62)


def _eval_sets(task: TaskParams, train: TrainParams) -> tuple[Prompts, Prompts]:
    evals = sample(task, train.eval_batch, seed=_data_seed(train.seed, 2 ** 40))
    probes = sample(task, train.probes, seed=_data_seed(train.seed, 2 ** 41))
    return evals, probes


def _optimizer(model: nn.Module, train: TrainParams) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr)
    return torch.optim.SGD(model.parameters(), lr=train.lr)


def _same_settings(saved: dict, wanted: dict) -> list[str]:
    """The settings that differ (`train.steps` may grow under a constant schedule)."""
    diffs = []
    for group in ("task", "model", "train"):
        for key, value in wanted[group].items():
            old = saved[group].get(key)
            old = tuple(old) if isinstance(old, list) else old
            if old != value and not (group == "train" and key == "steps" and wanted["train"]["schedule"] == "constant"):
                diffs.append(f"{group}.{key}: saved {old!r}, asked {value!r}")
    return diffs


def train(task: TaskParams, model_params: ModelParams, train_params: TrainParams, *, out: str | Path | None = None,
          progress: bool = True, stop_after: int | None = None) -> ICLRun:
    """Train (or, with `out` holding a checkpoint of the same settings, continue training) a model.

    Args:
        task: the prompt distribution.
        model_params: which model and its initialisation.
        train_params: optimisation and recording settings.
        out: folder for checkpoints; None keeps everything in memory.
        progress: show a tqdm bar.
        stop_after: stop at the first checkpoint at or after this step (an interruption, for tests).

    Returns:
        The ICLRun with its history over checkpoints.

    Raises:
        CheckpointMismatchError: `out` holds a run with other settings (or one already past `train_params.steps`).
    """
    out = Path(out) if out is not None else None
    evals, probes = _eval_sets(task, train_params)
    fresh = ICLRun(task=task, model_params=model_params, train_params=train_params, model=build(model_params, task),
                   history={}, probes=probes, meta={})
    if out is not None and (out / CHECKPOINT_FILE).exists():
        run, opt_sd = _load(out)
        diffs = _same_settings(run.settings(), fresh.settings())
        if run.step > train_params.steps:
            diffs.append(f"it is already at step {run.step} > train.steps = {train_params.steps}")
        if diffs:
            raise CheckpointMismatchError(
                f"{out} holds a run with other settings ({'; '.join(diffs)}); use another folder")
        run.train_params = train_params
        optimizer = _optimizer(run.model, train_params)
        if opt_sd["state"]:
            optimizer.load_state_dict(opt_sd)
        if run.step < train_params.steps:
            run.meta["resumed_at"] = [*run.meta.get("resumed_at", []), run.step]
        lists = {k: list(v.unbind(0)) for k, v in run.history.items()}
    else:
        run = fresh
        optimizer = _optimizer(run.model, train_params)
        run.meta = _meta()
        lists = {k: [] for k in ("steps", "train_mse", "eval_mse", "eval_clean_mse", "kq", "ov", "probe_pred")}

    model, tp = run.model, train_params

    def record(step: int, train_mse: float) -> None:
        pred = predict(model, evals)
        values = {"steps": torch.tensor(step), "train_mse": torch.tensor(train_mse),
                  "eval_mse": ((pred - evals.yq) ** 2).mean(), "eval_clean_mse": ((pred - evals.clean) ** 2).mean(),
                  "kq": model.kq(), "ov": model.ov(), "probe_pred": predict(model, probes)}
        for k, v in values.items():
            lists[k].append(v.float() if k != "steps" else v.long())
        run.history = {k: torch.stack(v) for k, v in lists.items()}

    if not lists["steps"]:
        record(0, float("nan"))
    start, clock = run.step, time.perf_counter()
    seconds = run.meta.get("seconds", 0.0)
    acc, count = 0.0, 0
    bar = tqdm(total=tp.steps, initial=start, disable=not progress, desc=model_params.name, leave=False)
    for step in range(start, tp.steps):
        for group in optimizer.param_groups:
            group["lr"] = tp.lr_at(step)
        batch = sample(task, tp.batch, seed=_data_seed(tp.seed, step))
        z, zq = batch.tokens()
        mse = ((model(z, zq) - batch.yq) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        (0.5 * mse if tp.loss == "half_mse" else mse).backward()
        optimizer.step()
        acc, count = acc + mse.item(), count + 1
        bar.update(1)
        done = step + 1
        if done % tp.checkpoint_every == 0 or done == tp.steps:
            record(done, acc / count)
            acc, count = 0.0, 0
            bar.set_postfix(mse=f"{float(run.history['eval_mse'][-1]):.4f}")
            run.meta["seconds"] = round(seconds + time.perf_counter() - clock, 3)
            if out is not None:
                run.save(out, optimizer)
            if stop_after is not None and done >= stop_after:
                break
    bar.close()
    run.meta["seconds"] = round(seconds + time.perf_counter() - clock, 3)
    if out is not None and start < tp.steps:
        run.save(out, optimizer)
    return run


def _meta() -> dict:
    from headlab.version import __version__

    return {"headlab": __version__, "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads(),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "seconds": 0.0}
