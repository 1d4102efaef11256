"""headlab: a workbench for the mechanistic study of attention heads."""

from headlab.edits import Ablate, Scale, ablate, edit
from headlab.errors import (
    EditError,
    HeadIndexError,
    HeadlabError,
    ModelNotFoundError,
    PromptError,
    UnsupportedModelError,
)
from headlab.heads import HeadRef, as_heads
from headlab.models import BUNDLED, HeadModel, load
from headlab.run import Batch, Run
from headlab import analyses, icl, prune, results, scan, viz

__version__ = "0.1.0"

__all__ = [
    "Ablate", "BUNDLED", "Batch", "EditError", "HeadIndexError", "HeadModel", "HeadRef", "HeadlabError",
    "ModelNotFoundError", "PromptError", "Run", "Scale", "UnsupportedModelError", "ablate", "as_heads", "edit",
    "load",
]
