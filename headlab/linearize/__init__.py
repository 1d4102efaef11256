"""Linearizing a pretrained model head by head (Hedgehog attention transfer) and what it does to each head.

`hl.linearize` loads on first use (it trains)."""

from headlab.linearize.transfer import TransferParams, build_linearized, train_layer

__all__ = ["TransferParams", "build_linearized", "train_layer"]
