"""headlab: a workbench for the mechanistic study of attention heads."""

from headlab.edits import Ablate, MoH, Patch, Scale, ablate, edit
from headlab.errors import (
    EditError,
    HeadIndexError,
    HeadlabError,
    ModelNotFoundError,
    PromptError,
    UnsupportedModelError,
    WeightsError,
)
from headlab.heads import HeadRef, as_heads
from headlab.models import BUNDLED, HeadModel, load
from headlab.run import Batch, Run
from headlab import analyses, results, scan, viz

# `hl.icl` (training one-layer models), `hl.prune` and `hl.circuits` (experiments) load on first use: `import headlab` loads no
# training code
_LAZY = ("circuits", "icl", "linearize", "moh", "prune")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"headlab.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'headlab' has no attribute {name!r}")

from headlab.version import __version__  # noqa: E402

__all__ = [
    "Ablate", "BUNDLED", "Batch", "EditError", "HeadIndexError", "HeadModel", "HeadRef", "HeadlabError",
    "ModelNotFoundError", "MoH", "Patch", "PromptError", "Run", "Scale", "UnsupportedModelError", "WeightsError", "ablate", "as_heads",
    "edit",
    "load",
]
