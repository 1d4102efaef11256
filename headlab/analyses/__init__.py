"""Analyses: plain functions over a HeadModel returning result objects."""

from headlab.analyses.induction import InductionParams, copy_losses, induction_scan, repeated_tokens

__all__ = ["InductionParams", "copy_losses", "induction_scan", "repeated_tokens"]
