"""Head interventions, all scoped: `with headlab.edit(model, [...]):`."""

from headlab.edits.heads import Ablate, Scale, ablate, compile_edits, edit, mean_head_outputs

__all__ = ["Ablate", "Scale", "ablate", "compile_edits", "edit", "mean_head_outputs"]
