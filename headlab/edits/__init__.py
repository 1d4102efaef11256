"""Head interventions, all scoped: `with headlab.edit(model, [...]):`."""

from headlab.edits.heads import Ablate, Scale, ablate, compile_edits, edit, mean_head_outputs
from headlab.edits.kv_policy import DecodeOnly, RazorKV

__all__ = ["Ablate", "DecodeOnly", "RazorKV", "Scale", "ablate", "compile_edits", "edit", "mean_head_outputs"]
