"""Short names for the head scans: `hl.scan.induction(model)`."""

from headlab.analyses.induction import induction_scan as induction

__all__ = ["induction"]
