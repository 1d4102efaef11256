"""In-context linear regression: tasks, one-layer attention models, training, theory checks (figures: headlab.viz.icl).

Zhang, Frei & Bartlett's linear self-attention (and Theorem 4.1's closed form) beside He et al.'s
multi-head softmax attention (and its diagonal/last-entry/zero-sum head patterns); see
`headlab.icl.report` for every check at the papers' default sizes.
"""

from headlab.icl.baselines import debiased_gd, gd_one_step, ols, optimal_gd_step, posterior_mean, ridge
from headlab.icl.evals import covariate_shift, dgd_agreement, errors_vs_n
from headlab.icl.models import LSA, HeadAttention, ModelParams, build, predict
from headlab.icl.tasks import Prompts, Shift, TaskParams, sample
from headlab.icl.theory import (
    gamma,
    head_measures,
    lsa_check,
    lsa_optimum,
    lsa_population_flow,
    lsa_population_loss,
    pattern_summary,
    rel_dist,
)
from headlab.icl.training import CheckpointMismatchError, ICLRun, TrainParams, train

__all__ = [
    "CheckpointMismatchError", "HeadAttention", "ICLRun", "LSA", "ModelParams", "Prompts", "Shift", "TaskParams",
    "TrainParams", "build", "covariate_shift", "debiased_gd", "dgd_agreement", "errors_vs_n", "gamma",
    "gd_one_step", "head_measures", "lsa_check", "lsa_optimum", "lsa_population_flow", "lsa_population_loss",
    "ols", "optimal_gd_step", "pattern_summary", "posterior_mean", "predict", "rel_dist", "ridge", "sample", "train",
]
