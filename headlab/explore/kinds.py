"""The explorer's Linear vs softmax tab: one prompt through two of the bundled twins (same data, same recipe, a
different attention kind), one head's pattern side by side, and the head zeroed in both.

A linear-attention head's "pattern" is its implicit one (`pattern @ v` equals the layer's output, checked and shown
per model); GLA and DeltaNet weights are signed and unnormalised, so their figures use a diverging scale (viz).
"""

from __future__ import annotations

import math
from typing import Any

import headlab as hl
from headlab.analyses.kinds import pattern_identity_error
from headlab.errors import ModelNotFoundError, PromptError
from headlab.explore.core import Explorer, md_token, predict
from headlab.heads import HeadRef
from headlab.models.bundled import BUNDLED
from headlab.models.head_model import HeadModel

TWINS = tuple(name for name in BUNDLED if name.startswith("twin-"))
DEFAULT_TWINS = ("twin-text-softmax", "twin-text-gla")
DEFAULT_TEXT = "In the beginning God created the heaven and the earth. And the earth was without form"


def twin(ex: Explorer, name: str) -> HeadModel:
    """A bundled twin from the explorer's twin cache (only the bundled twins: nothing else is read here)."""
    name = (name or "").strip()
    if name not in TWINS:
        raise ModelNotFoundError(f"unknown twin {name!r}: choose one of {', '.join(TWINS)}")
    return ex.twins.get(name)


def twin_column(ex: Explorer, name: str, text: str, head: HeadRef, zero: bool) -> tuple[Any, str]:
    """(one twin's pattern figure for `head` on `text`, Markdown: kind, row sums, pattern identity, loss with the
    head zeroed beside the original, top predictions)."""
    model = twin(ex, name)
    if not (text or "").strip():
        raise PromptError("empty prompt: type some text for the twins (they read bytes)")
    model.check_heads([head])
    batch = model.encode(text, prepend_bos=model.bos_id is not None)
    # encode refuses a prompt longer than the twin's context, naming both
    run = model.run(batch, heads=[head])
    kind = model.layer_kinds[head.layer]
    fig = run.figure(head, title=f"{name}: {head} ({kind})")
    rows = run.pattern(head)[0].float().sum(-1)
    identity = pattern_identity_error(model, batch)[head.layer]
    loss, top = predict(model, batch, 5)
    lines = [f"**{name}**, layer {head.layer} is **{kind}**; pattern rows sum to {float(rows.min()):.3f}"
             f"…{float(rows.max()):.3f}; max |pattern @ v − output| / max |output| = {identity:.1e}.",
             "Next byte: " + ", ".join(f"{md_token(t, table=False)} {p:.2f}" for t, p in top)
             + f"; loss on the prompt **{loss:.4f}** nats/byte."]
    if zero:
        zeroed, ztop = predict(model, batch, 5, hl.Ablate(head, how="zero"))
        lines.append(f"{head} zeroed: loss **{zeroed:.4f}** ({zeroed - loss:+.4f}); next byte "
                     + ", ".join(f"{md_token(t, table=False)} {p:.2f}" for t, p in ztop) + ".")
    return fig, "\n\n".join(lines)


def twins_view(ex: Explorer, left: str, right: str, text: str, layer: float | None, head: float | None,
               zero: bool = False) -> tuple[str, Any, str, Any, str]:
    """(status, left figure, left Markdown, right figure, right Markdown) for one head of both twins."""
    for name, value in (("layer", layer), ("head", head)):
        if value is None or not math.isfinite(float(value)):
            raise PromptError(f"{name} must be an integer, got {value!r}")
    ref = HeadRef(int(layer), int(head))
    lfig, lmd = twin_column(ex, left, text, ref, zero)
    rfig, rmd = twin_column(ex, right, text, ref, zero)
    return f"{ref} of {left} beside {right}" + (" (zeroed in both below)." if zero else "."), lfig, lmd, rfig, rmd
