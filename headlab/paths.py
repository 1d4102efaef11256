"""Where headlab's bundled files live: every path into the checkout's `data/` and `apps/`, in one place.

headlab runs from its checkout (an editable install): `data/` holds the toy model, the twins, texts, tasks, circuit
tasks and haystacks, and is not packaged. A low module (pathlib only) that any layer may import.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
APP_FILE = ROOT / "apps" / "explorer.py"

TOY_INDUCTION_DIR = DATA / "toy-induction"
TWINS_DIR = DATA / "linear-twins"
MOH_TWINS_DIR = DATA / "moh-twins"  # a Mixture-of-Head model and its MHA twin (headlab.models.linear.train)
MQAR_TWINS_DIR = DATA / "mqar-twins"  # one MQAR model per twin kind, evaluated at length (headlab.models.linear.train)
TEXT_DIR = DATA / "text"
TASKS_DIR = DATA / "tasks"
SINKS_DIR = DATA / "sinks"
HAYSTACKS_DIR = DATA / "haystacks"
CIRCUITS_DIR = DATA / "circuits"

# The two KJV texts. The twins train on John and hold out Genesis 1-15; the pruning rankers calibrate on Genesis
# (`prune.evals.default_calibration`) — so a twin's held-out text is the rankers' calibration text. Keep that in mind
# before evaluating a pruned twin on Genesis.
KJV_JOHN = TEXT_DIR / "kjv-john.txt"
KJV_GENESIS = TEXT_DIR / "kjv-genesis-1-15.txt"


def circuits() -> Path:
    """The circuit-discovery tasks' folder, `data/circuits/` (a `<task>.json` each, read by headlab.tasks.circuits)."""
    return CIRCUITS_DIR
