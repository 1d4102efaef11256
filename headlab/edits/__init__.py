"""Head interventions, all scoped: `with headlab.edit(model, [...]):`."""

from headlab.edits.heads import Ablate, Scale, ablate, compile_edits, edit, mean_head_outputs
from headlab.edits.kv_policy import DecodeOnly, RazorKV
from headlab.edits.razor_cache import RazorCache
from headlab.edits.moh import LearnedRouter, MoH, QueryNormRouter
from headlab.edits.patch import Add, Attend, Patch

__all__ = ["Ablate", "Add", "Attend", "DecodeOnly", "LearnedRouter", "MoH", "Patch", "QueryNormRouter", "RazorCache", "RazorKV", "Scale", "ablate", "compile_edits", "edit",
           "mean_head_outputs"]
