"""Head pruning: rankers, progressive masked-pruning experiments, and structural pruning that saves compute."""

from headlab.prune.costs import (
    compare,
    equality,
    forward_seconds,
    kv_bytes_per_token,
    measured_kv_bytes,
    param_count,
)
from headlab.prune.evals import InductionTask, TextEval, default_calibration, parse_eval
from headlab.prune.experiment import PruneParams, PruneResults, parse_fractions, prune_experiment, read_rows
from headlab.prune.rankers import (
    RANKERS,
    RankParams,
    ablation_scores,
    atp_scores,
    compare_atp,
    n_to_remove,
    prune_order,
    rank,
    register_ranker,
    spearman,
)
from headlab.prune.structural import (
    is_pruned_folder,
    layouts_for,
    load_pruned,
    pruned_layouts,
    remove_heads,
    save_pruned,
)

__all__ = [
    "InductionTask", "PruneParams", "PruneResults", "RANKERS", "RankParams", "TextEval", "ablation_scores",
    "atp_scores", "compare", "compare_atp", "default_calibration", "equality", "forward_seconds", "is_pruned_folder",
    "kv_bytes_per_token", "layouts_for", "load_pruned", "measured_kv_bytes", "n_to_remove", "param_count",
    "parse_eval", "parse_fractions", "prune_experiment", "prune_order", "pruned_layouts", "rank", "read_rows",
    "register_ranker", "remove_heads", "save_pruned", "spearman",
]
