"""Result objects: per-head score maps `[L, H]` with the settings and per-item data that made them."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from headlab.heads import HeadRef

SCORES_FILE = "scores.json"
ITEMS_FILE = "items.safetensors"


@dataclass
class HeadScores:
    """Named per-head score maps of one analysis.

    Attributes:
        analysis: the analysis that made it (e.g. "induction").
        model: the model's name.
        maps: score maps, each a float tensor `[L, H]`; `primary` names the main one.
        primary: the key of `maps` that `scores`, `top` and `figure` use by default.
        params: the settings that produced it (a params dataclass as a dict).
        meta: facts about the run (model geometry, device, dtype, versions, time, notes).
        items: per-item data (e.g. per-sequence maps `[B, L, H]`, the token ids), saved as safetensors.
    """

    analysis: str
    model: str
    maps: dict[str, torch.Tensor]
    primary: str
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    items: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.primary not in self.maps:
            raise KeyError(f"primary map {self.primary!r} not among {sorted(self.maps)}")

    @property
    def scores(self) -> torch.Tensor:
        """The primary map `[L, H]`."""
        return self.maps[self.primary]

    def top(self, k: int = 5, *, map: str | None = None, largest: bool = True) -> list[tuple[HeadRef, float]]:
        """The k highest-scoring heads of a map (the primary one by default) with their scores."""
        scores = self.maps[map or self.primary]
        flat = scores.flatten().nan_to_num(float("-inf") if largest else float("inf"))
        k = min(k, flat.numel())
        values, idx = flat.topk(k, largest=largest)
        n_heads = scores.shape[1]
        return [(HeadRef(int(i) // n_heads, int(i) % n_heads), float(v)) for v, i in zip(values, idx)]

    def figure(self, map: str | None = None):
        """A layer × head heatmap of a map (plotly)."""
        from headlab.viz import heatmap

        key = map or self.primary
        return heatmap(self.maps[key], title=f"{self.analysis}: {key} — {self.model}", colorbar=key)

    def to_json(self) -> dict[str, Any]:
        return {
            "analysis": self.analysis,
            "model": self.model,
            "primary": self.primary,
            "scores": self.scores.tolist(),
            "maps": {k: v.tolist() for k, v in self.maps.items()},
            "top": [[str(h), s] for h, s in self.top(10)],
            "params": self.params,
            "meta": self.meta,
        }

    def save(self, folder: str | Path) -> Path:
        """Write `scores.json` and `items.safetensors` into `folder`; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SCORES_FILE).write_text(json.dumps(self.to_json(), indent=1))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.items.items()}, str(folder / ITEMS_FILE))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "HeadScores":
        folder = Path(folder)
        data = json.loads((folder / SCORES_FILE).read_text())
        items_path = folder / ITEMS_FILE
        items = load_file(str(items_path)) if items_path.exists() else {}
        return cls(
            analysis=data["analysis"], model=data["model"], primary=data["primary"],
            maps={k: torch.tensor(v, dtype=torch.float32) for k, v in data["maps"].items()},
            params=data.get("params", {}), meta=data.get("meta", {}), items=items,
        )


def params_dict(params: Any) -> dict[str, Any]:
    """A params dataclass as a JSON-ready dict."""
    return json.loads(json.dumps(dataclasses.asdict(params), default=str))


def run_meta(model: Any, **extra: Any) -> dict[str, Any]:
    """The facts about a model and environment that every result records."""
    import transformers

    from headlab.version import __version__

    return {
        "model_class": type(model.hf).__name__,
        "n_layers": model.n_layers, "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads,
        "head_dim": model.head_dim, "causal": model.causal,
        "device": model.device.type, "dtype": str(model.dtype).removeprefix("torch."),
        "backend": model.backend, "numerics": "raw HF weights, no folding or centering",
        "headlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        **({"weights_note": model.note} if getattr(model, "note", "") else {}),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
