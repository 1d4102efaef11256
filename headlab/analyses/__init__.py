"""Analyses: plain functions over a HeadModel returning result objects."""

from headlab.analyses.induction import InductionParams, copy_losses, induction_scan, repeated_tokens
from headlab.analyses.kinds import KindComparison, KindParams, compare_kinds, head_metrics

__all__ = ["InductionParams", "KindComparison", "KindParams", "compare_kinds", "copy_losses", "head_metrics",
           "induction_scan", "repeated_tokens"]
