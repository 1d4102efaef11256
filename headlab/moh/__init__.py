"""Mixture-of-head attention (MoH): a pretrained model's heads routed per token as an edit (`headlab.MoH`), its
conversion measured against static pruning, trained routers, and routing analytics.

`hl.moh` loads on first use (it trains routers)."""

from headlab.edits.moh import LearnedRouter, MoH, QueryNormRouter, RandomRouter, query_norm_scores
from headlab.moh.convert import Conversion, ConvertParams, conversion_sweep, evaluate, trained_router
from headlab.moh.routing import TOKEN_TYPES, MoHRouting, token_flags, trace
from headlab.moh.train import RouterParams, load_router, new_router, train_router

__all__ = ["Conversion", "ConvertParams", "LearnedRouter", "MoH", "MoHRouting", "QueryNormRouter", "RandomRouter", "RouterParams",
           "TOKEN_TYPES", "conversion_sweep", "evaluate", "load_router", "new_router", "query_norm_scores",
           "token_flags", "trace", "train_router", "trained_router"]
