"""Offline evaluation tasks: multiple-choice items from committed word lists, scored by option log-probabilities."""

from headlab.tasks.choice import TASKS, ChoiceItem, TaskSplits, build_tasks
from headlab.tasks.scoring import EncodedItems, correct, encode_items, option_logprobs, paired_bootstrap, wilson

__all__ = ["TASKS", "ChoiceItem", "EncodedItems", "TaskSplits", "build_tasks", "correct", "encode_items",
           "option_logprobs", "paired_bootstrap", "wilson"]
