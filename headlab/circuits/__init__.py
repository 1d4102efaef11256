"""Circuits across tasks: exact / path / attribution patching, circuits as results, reuse between tasks, and the
weights-based composition scores (`headlab.circuits.composition`)."""

from headlab.circuits.circuit import (Circuit, CircuitHead, DiscoverParams, RoleRules, compare, discover,
                                      load_comparison, role_scores)
from headlab.circuits.patching import (Edge, PatchingError, Prepared, agreement, atp, atp_star, exact_patching,
                                       path_patching, prepare)
from headlab.circuits.reuse import Comparison, PairOverlap, overlap, overlap_matrix, top_heads

__all__ = ["Circuit", "CircuitHead", "Comparison", "DiscoverParams", "Edge", "PairOverlap", "PatchingError", "Prepared",
           "RoleRules", "agreement", "atp", "atp_star", "compare", "discover", "exact_patching", "load_comparison",
           "overlap", "overlap_matrix", "path_patching", "prepare", "role_scores", "top_heads"]
