"""Short names for the head scans: `hl.scan.induction(model)`."""

from headlab.analyses.induction import induction_scan as induction
from headlab.analyses.razor import echo_induction_scan as razor
from headlab.analyses.retrieval import retrieval_scan as retrieval
from headlab.analyses.sinks import sink_scan as sinks

__all__ = ["induction", "razor", "retrieval", "sinks"]
