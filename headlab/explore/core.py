"""The explorer's shared core, free of Gradio: settings, caches, the Session, the Heads and MoH routing tabs.

An `Explorer` holds what every browser session shares: the settings and a per-process
model cache (name → HeadModel, loaded once, guarded by a lock). Everything a session
owns (the analysed prompt, its scores, its originals) travels in a frozen `Session`
value that the app keeps in a `gr.State`; edits are opened with `hl.edit` inside the
call that measures them, so they are private to that call's thread and gone when it
returns. Bad input raises a HeadlabError whose message the app shows as it is.
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

import headlab as hl
from headlab.analyses.prompt_scores import MAPS, PromptScoreParams, prompt_scores
from headlab.capture import LayerRecord
from headlab.errors import EditError, HeadlabError, ModelNotFoundError, PromptError
from headlab.heads import HeadRef
from headlab.losses import next_token_losses
from headlab.models.bundled import BUNDLED
from headlab.models.head_model import HeadModel
from headlab.run import Batch, Run

DEFAULT_MODEL = "smollm2-135m"
HOW = ("zero", "mean", "uniform", "scale")
MAP_LABELS = {"prev_token": "previous-token", "induction": "induction-like", "first_token": "first-token sink",
              "entropy": "entropy (nats)"}
from headlab.paths import APP_FILE  # noqa: E402,F401
_IDS_RE = re.compile(r"^[\s,]*\d+([\s,]+\d+)*[\s,]*$")


@dataclass(frozen=True, kw_only=True)
class ExplorerSettings:
    """Settings shared by every session of one explorer.

    Attributes:
        max_tokens: longest prompt (in tokens) the explorer analyses; longer ones get a message.
        top_k: how many next-token predictions to show.
        window: default side of the pattern window (positions on each axis).
        cached_prompts: how many analysed prompts keep their per-layer q/k/v for showing heads (about
            200 MB each for SmolLM2 at 2048 tokens); a prompt past that is run again when a head is shown.
        allowed: model names or folders clients may load besides the bundled names (the launch --model).
        allow_folders: let clients load any local HF folder on the server by typing its path (off by default:
            any client could otherwise make the server read and keep arbitrary folders).
        max_models: models kept loaded at once (least recently used dropped first).
        token_view_bytes: budget of the Heads tab's token view payload; a head (or layer) whose T×T patterns would
            exceed it is shown through streaming statistics instead (explore/tokens.py).
    """

    max_tokens: int = 2048
    top_k: int = 10
    window: int = 48
    cached_prompts: int = 4
    allowed: tuple[str, ...] = ()
    allow_folders: bool = False
    max_models: int = 2
    token_view_bytes: int = 1_500_000


@dataclass(frozen=True)
class Session:
    """What one browser session has analysed: its model, prompt ids, score maps `[L, H]` and originals."""

    model: str
    ids: tuple[int, ...]
    maps: dict[str, torch.Tensor] = field(compare=False)
    top: tuple[tuple[str, float], ...] = ()
    loss: float = math.nan

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


class ModelCache:
    """Models loaded once per process, at most `max_models` at a time (least recently used dropped first), guarded
    by a lock (one load per name at a time). Clients may load the bundled names and `allowed` ones; any other folder
    only with `allow_folders`."""

    def __init__(self, loader: Callable[[str], HeadModel] | None = None, *, allowed: tuple[str, ...] | None = None,
                 allow_folders: bool = True, max_models: int = 2) -> None:
        self._loader = loader or _load
        self._models: OrderedDict[str, HeadModel] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._allowed = {self._key(a) for a in (allowed or ()) if (a or "").strip()}
        self._allow_folders = allow_folders
        self._max = max(1, int(max_models))

    @staticmethod
    def _key(name: str) -> str:
        name = name.strip()
        return name if name in BUNDLED else str(Path(name).expanduser().resolve())

    def get(self, name: str) -> HeadModel:
        name = (name or "").strip()
        if not name:
            raise ModelNotFoundError(f"choose a model: a bundled name ({', '.join(BUNDLED)}) or a local HF folder")
        key = self._key(name)
        if name not in BUNDLED and key not in self._allowed and not self._allow_folders:
            served = ", ".join([*BUNDLED, *sorted(a for a in self._allowed if a not in BUNDLED)])
            raise ModelNotFoundError(f"this explorer serves {served}; loading other folders is off (start it with "
                                     "--allow-folders to let clients load any folder on the server)")
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one load per name; gets of other names never wait for it
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            model = self._loader(name)
            with self._lock:
                self._models[key] = model
                self._models.move_to_end(key)
                while len(self._models) > self._max:
                    self._models.popitem(last=False)
            return model

    def loaded(self) -> list[str]:
        """The keys of the models held now, least recently used first."""
        with self._lock:
            return list(self._models)


class RecordCache:
    """Per-layer q/k/v of the last few analysed prompts, keyed by (model, token ids), so that showing a head
    needs no second forward. It is addressed by content (any session analysing the same prompt would compute
    the same records, with no edit active), so it holds nothing private to a session."""

    def __init__(self, size: int) -> None:
        self._items: OrderedDict[tuple, dict[int, LayerRecord]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def put(self, key: tuple, records: dict[int, LayerRecord]) -> None:
        with self._lock:
            self._items[key] = records
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def get(self, key: tuple) -> dict[int, LayerRecord] | None:
        with self._lock:
            return self._items.get(key)


def _load(name: str) -> HeadModel:
    try:
        return hl.load(name)
    except HeadlabError:
        raise
    except Exception as err:  # a broken folder fails deep inside transformers: say which model and why
        raise ModelNotFoundError(f"could not load {name!r}: {type(err).__name__}: {err}") from err


def parse_prompt(model: HeadModel, text: str, *, prepend_bos: bool, max_tokens: int) -> Batch:
    """Text (or space-separated token ids for a model without a tokenizer) → a one-prompt Batch, length-capped."""
    if not (text := text or "").strip():
        raise PromptError("empty prompt: type some text to analyse")
    if len(text) > 64 * max_tokens:  # refuse a huge paste before spending time tokenizing it
        raise PromptError(f"prompt of {len(text):,} characters is far above the cap of {max_tokens} tokens")
    if model.tokenizer is None and not _IDS_RE.match(text):
        raise PromptError(f"{model.name} has no tokenizer: type token ids separated by spaces, "
                          f"e.g. {example_prompt(model)}")
    prompt: Any = text if model.tokenizer is not None else [int(t) for t in re.findall(r"\d+", text)]
    batch = model.encode(prompt, prepend_bos=prepend_bos and model.bos_id is not None)
    n = batch.input_ids.shape[1]
    if n > max_tokens:
        raise PromptError(f"prompt of {n} tokens is above the explorer's cap of {max_tokens} tokens: shorten it "
                          "(or start the explorer with --max-tokens N)")
    return batch


def example_prompt(model: HeadModel) -> str:
    """A prompt with a repeated phrase (so induction-like scores are defined) that the model can read."""
    if model.tokenizer is None:
        block = [(7 * i + 3) % max(2, (model.vocab_size or 50) - 1) + 1 for i in range(12)]
        bos = model.bos_id if model.bos_id is not None else block[0]
        return " ".join(str(t) for t in [bos, *block, *block[:8]])
    return "The cat sat on the mat. The dog ran in the park. The cat sat on the"


def parse_heads(model: HeadModel, text: str) -> list[HeadRef]:
    """`L1H2, L0H3` (commas or spaces) → checked HeadRefs of the model."""
    parts = [p for p in re.split(r"[\s,;]+", (text or "").strip()) if p]
    if not parts:
        raise EditError("select at least one head: click a cell of the grid or type heads like L1H0, L0H3")
    heads = hl.as_heads(parts)
    model.check_heads(heads)
    return heads


def add_head(heads_text: str, head_text: str) -> str:
    """The edit's head list with one more head (the selected one), without duplicates."""
    head = HeadRef.parse(head_text or "")
    parts = [p for p in re.split(r"[\s,;]+", (heads_text or "").strip()) if p]
    if str(head) not in {p.upper() for p in parts}:
        parts.append(str(head))
    return ", ".join(parts)


def make_edits(model: HeadModel, heads: list[HeadRef], how: str, factor: float | None,
               reference: Batch) -> list[hl.Ablate | hl.Scale]:
    """Edits of the chosen kind; a mean ablation takes the mean over the analysed prompt's own positions."""
    if how == "scale":
        if factor is None or not math.isfinite(float(factor)):
            raise EditError(f"scale needs a finite factor, got {factor!r}")
        return [hl.Scale(h, factor=float(factor)) for h in heads]
    if how not in HOW:
        raise EditError(f"unknown edit {how!r}: choose one of {', '.join(HOW)}")
    return hl.ablate(heads, how=how, reference=reference if how == "mean" else None)


def top_predictions(model: HeadModel, next_logits: torch.Tensor, k: int) -> tuple[tuple[str, float], ...]:
    """The k most likely next tokens given the logits `[V]` of the last position, with probabilities."""
    probs = torch.softmax(next_logits.float(), -1)
    values, idx = probs.topk(min(k, probs.numel()))
    return tuple(zip(model.token_strings(idx.tolist()), values.tolist()))


def predict(model: HeadModel, batch: Batch, k: int, edits: Any = ()) -> tuple[float, tuple[tuple[str, float], ...]]:
    """One forward of a one-prompt batch under `edits` (scoped with `hl.edit`; none: the model as it is).

    Args:
        model: a causal-LM HeadModel.
        batch: the prompt, as `model.encode` gives it.
        k: how many next-token predictions to return.
        edits: an edit or a list of them.

    Returns:
        (mean next-token cross-entropy over the prompt, NaN for a one-token prompt; the k most likely next tokens
        after the last position, with probabilities).
    """
    with hl.edit(model, edits), torch.no_grad():
        logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0].float()
    ids = batch.input_ids[0]
    loss = float(next_token_losses(logits, ids).mean()) if len(ids) > 1 else math.nan
    return loss, top_predictions(model, logits[-1], k)


def md_token(token: str, *, table: bool = True) -> str:
    """A token as a Markdown code span that survives backticks (and pipes, inside a table)."""
    text = repr(token).replace("|", "\\|") if table else repr(token)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def predictions_md(top: tuple[tuple[str, float], ...]) -> str:
    rows = "\n".join(f"| {i + 1} | {md_token(t)} | {p:.4f} |" for i, (t, p) in enumerate(top))
    return f"| rank | token | p |\n|---|---|---|\n{rows}"


def comparison_md(original: tuple[tuple[str, float], ...], edited: tuple[tuple[str, float], ...],
                  loss: float, edited_loss: float, label: str) -> str:
    """Side-by-side next-token predictions and loss, original vs edited."""
    head = f"**{label}**\n\n| rank | original | p | edited | p |\n|---|---|---|---|---|\n"
    rows = "\n".join(f"| {i + 1} | {md_token(a)} | {pa:.4f} | {md_token(b)} | {pb:.4f} |"
                     for i, ((a, pa), (b, pb)) in enumerate(zip(original, edited)))
    delta = edited_loss - loss
    return head + rows + (f"\n\nloss (mean next-token cross-entropy over the prompt): original **{loss:.4f}** → "
                          f"edited **{edited_loss:.4f}** ({delta:+.4f})")


class Explorer:
    """The explorer's actions; holds only what all sessions share (settings, model and record caches)."""

    def __init__(self, settings: ExplorerSettings = ExplorerSettings(), cache: ModelCache | None = None) -> None:
        self.settings = settings
        self.cache = cache or ModelCache(allowed=settings.allowed, allow_folders=settings.allow_folders,
                                         max_models=settings.max_models)
        self.records = RecordCache(settings.cached_prompts)
        # the linear-vs-softmax tab's bundled twins (tiny): a cache of their own, so they never evict the main model
        self.twins = ModelCache(allow_folders=False, max_models=4)

    def model_info(self, name: str, prompt: str = "") -> tuple[str, str]:
        """(status Markdown on the model, a prompt it can read: `prompt` itself when it can)."""
        model = self.cache.get(name)
        if not (prompt or "").strip() or (model.tokenizer is None and not _IDS_RE.match(prompt)):
            prompt = example_prompt(model)
        note = f" Note: {model.note}." if model.note else ""
        kind = "causal LM" if model.is_lm and model.causal else "no LM head: scores and patterns only"
        return f"Loaded `{model!r}` ({kind}).{note}", prompt

    def analyse(self, name: str, text: str, prepend_bos: bool, map_name: str) -> tuple[str, Any, str, Session]:
        """Score every head on the prompt: (status, grid figure, predictions Markdown, new Session)."""
        model = self.cache.get(name)
        batch = parse_prompt(model, text, prepend_bos=prepend_bos, max_tokens=self.settings.max_tokens)
        records: dict[int, LayerRecord] = {}
        scores = prompt_scores(model, batch, PromptScoreParams(), records=records)
        ids = scores.items["tokens"]
        self.records.put((model.owner, tuple(ids.tolist())), records)
        session = Session(model=name.strip(), ids=tuple(ids.tolist()), maps=scores.maps)
        preds = f"{model.name} has no LM head: no next-token predictions."
        if "next_logits" in scores.items:
            losses = scores.items["token_losses"]
            session = replace(session, top=top_predictions(model, scores.items["next_logits"], self.settings.top_k),
                              loss=float(losses.mean()) if losses.numel() else math.nan)
            preds = predictions_md(session.top) + f"\n\nloss on the prompt: **{session.loss:.4f}**"
        status = f"Analysed {session.n_tokens} tokens with {model.name}. {_repeat_note(session)}".strip()
        return status, self.grid(session, map_name), preds, session

    def analyse_and_show(self, name: str, text: str, prepend_bos: bool, map_name: str, start: float | None,
                         size: float | None) -> tuple[str, Any, str, Session, str, Any, str, str]:
        """Analyse, then show the head that stands out on the map, in one call (one status, one error path).

        Returns (status, grid, predictions, session, head, pattern, head Markdown, cleared comparison).
        """
        _, grid, preds, session = self.analyse(name, text, prepend_bos, map_name)
        head = self.best_head(session, map_name)
        shown, pattern, head_md = self.head_view(session, head, start, size)
        return f"{shown} {_repeat_note(session)}".strip(), grid, preds, session, head, pattern, head_md, ""

    def open_model(self, name: str, text: str, prepend_bos: bool, map_name: str, start: float | None,
                   size: float | None) -> tuple:
        """Load a model (cached), keep the prompt if it can read it (else an example), analyse and show a head.

        Returns (status, prompt, then the outputs of `analyse_and_show` after its status).
        """
        info, text = self.model_info(name, text)
        status, *rest = self.analyse_and_show(name, text, prepend_bos, map_name, start, size)
        return (f"{info} {status}", text, *rest)

    def grid(self, session: Session | None, map_name: str) -> Any:
        """The layer × head heatmap of one map of the session's scores."""
        _require(session)
        if map_name not in MAPS:
            raise PromptError(f"unknown score map {map_name!r}: choose one of {', '.join(MAPS)}")
        return hl.viz.heatmap(session.maps[map_name], colorbar=map_name,
                              title=f"{MAP_LABELS[map_name]} — click a cell to see its pattern")

    def show_map(self, session: Session | None, map_name: str) -> tuple[str, Any]:
        """(status, grid figure) for another score map of the analysed prompt."""
        figure = self.grid(session, map_name)
        return f"Showing {MAP_LABELS[map_name]} scores of {session.n_tokens} tokens.", figure

    @staticmethod
    def select_head(heads_text: str, head_text: str) -> tuple[str, str]:
        """(status, the edit's head list with the selected head added)."""
        heads = add_head(heads_text, head_text)
        return f"Heads to edit: {heads}.", heads

    @staticmethod
    def best_head(session: Session, map_name: str) -> str:
        """The head that stands out on a map (lowest entropy, else highest score), for a first pattern to show."""
        scores = session.maps[map_name]
        if not bool(torch.isfinite(scores).any()):
            scores = session.maps["prev_token"]
        flat = scores.flatten().nan_to_num(math.inf if map_name == "entropy" else -math.inf)
        index = int(flat.argmin() if map_name == "entropy" else flat.argmax())
        return str(HeadRef(index // scores.shape[1], index % scores.shape[1]))

    def head_view(self, session: Session | None, head_text: str, start: float | None,
                  size: float | None) -> tuple[str, Any, str]:
        """(status, the head's pattern over a window of positions, Markdown on the head).

        The window shows `size` positions on both axes from `start` (negative or None: the last `size`).
        """
        _require(session)
        model = self.cache.get(session.model)
        head = HeadRef.parse(head_text or "")
        model.check_heads([head])
        n = session.n_tokens
        size = max(2, min(n, int(size or self.settings.window)))
        auto = start is None or not math.isfinite(float(start)) or start < 0
        first = n - size if auto else int(start)
        first = max(0, min(first, n - size))
        records = self.records.get((model.owner, session.ids))
        if records is None:
            run = model.run(list(session.ids), heads=[head])
        else:
            run = Run(model=model, batch=model.encode(list(session.ids)), output=None, records=records, heads=[head])
        fig = run.figure(head, window=(first, first + size),
                         title=f"{head} — positions {first}..{first + size - 1} of {n}")
        info = self._head_md(run, session, head, first + size - 1)
        return f"Analysed {n} tokens with {model.name}; showing {head}.", fig, info

    @staticmethod
    def _head_md(run: hl.Run, session: Session, head: HeadRef, query: int) -> str:
        scores = ", ".join(f"{MAP_LABELS[k]} {float(v[head.layer, head.head]):.3f}" for k, v in session.maps.items())
        row = run.pattern(head)[0, query]
        values, idx = row.topk(min(5, int(row.numel())))
        tokens = run.tokens()
        keys = ", ".join(f"{md_token(f'{i}:{tokens[i]}', table=False)} {w:.3f}"
                         for w, i in zip(values.tolist(), idx.tolist()))
        return (f"**{head}**: {scores}.\n\nQuery {md_token(f'{query}:{tokens[query]}', table=False)} attends most "
                f"to: {keys}")

    def apply_edit(self, session: Session | None, heads_text: str, how: str,
                   factor: float | None) -> tuple[str, str]:
        """(status, Markdown of predictions and loss, original beside edited) for an edit of the session's prompt."""
        _require(session)
        model = self.cache.get(session.model)
        if not model.is_lm:
            raise EditError(f"{model.name} has no LM head: edits are measured through next-token predictions and "
                            "loss, which it does not have")
        heads = parse_heads(model, heads_text)
        batch = model.encode(list(session.ids))
        edits = make_edits(model, heads, how, factor, batch)
        loss, edited = predict(model, batch, self.settings.top_k, edits)
        label = f"{how} {'×' + format(float(factor), 'g') + ' ' if how == 'scale' else ''}{', '.join(map(str, heads))}"
        body = comparison_md(session.top, edited, session.loss, loss, label)
        return f"Applied {label} to {session.n_tokens} tokens (the shared model is untouched).", body

    def moh_view(self, session: Session | None, active: float | None, layer: float | None,
                 use_moh: bool = True) -> tuple[str, Any, str]:
        """Mixture-of-head routing of the analysed prompt (training-free query-norm router, `active` = share of the
        routed heads kept per token): (status, the tokens × heads gates of `layer`, Markdown comparing next-token
        predictions and loss without and with the MoH edit, heads and KV groups used, top heads per token type).
        `use_moh` False shows the routing but compares the original with itself (the edit toggled off)."""
        from headlab.moh.routing import trace

        _require(session)
        model = self.cache.get(session.model)
        if active is None or not math.isfinite(float(active)) or not 0.0 < float(active) <= 1.0:
            raise EditError(f"active share {active!r} must lie in (0, 1]: the share of routed heads kept per token")
        n_layer = int(layer) if layer is not None and math.isfinite(float(layer)) else 0
        model.check_layers([n_layer])
        moh = hl.MoH(active=float(active))
        routing = trace(model, moh, [torch.tensor(session.ids)])
        fig = routing.token_figure(0, n_layer, strings=model.token_strings(list(session.ids)))
        costs = routing.costs()
        k, n_routed, shared = routing.k, routing.n_routed, routing.shared
        lines = [f"**MoH, query-norm router**: heads 0–{shared - 1} shared, {k} of the {n_routed} routed heads per "
                 f"token: {costs['query_heads_on']:.1%} of (token, head) pairs computed, "
                 f"{costs['kv_groups_read']:.1%} of (token, KV group) caches read."]
        if model.is_lm:
            loss, top = predict(model, model.encode(list(session.ids)), self.settings.top_k, moh if use_moh else [])
            label = f"MoH {k}/{n_routed} routed heads" if use_moh else "MoH off (original)"
            lines.append(comparison_md(session.top, top, session.loss, loss, label))
        types = routing.by_type(top=3, min_tokens=2)
        rows = [f"| {name} | {entry['tokens']} | " + ", ".join(f"{h} ({lift:.2f}×)" for h, _, lift in entry["top"])
                + " |" for name, entry in types.items() if entry["top"]]
        if rows:
            lines.append("| token type | tokens | routed heads picked most (lift) |\n|---|---|---|\n" + "\n".join(rows))
        status = f"Routed {session.n_tokens} tokens; showing layer {n_layer}."
        return status, fig, "\n\n".join(lines)


def _require(session: Session | None) -> None:
    if session is None:
        raise PromptError("nothing analysed yet: type a prompt and press Analyse")


def _repeat_note(session: Session) -> str:
    if bool(torch.isfinite(session.maps["induction"]).any()):
        return ""
    return "No token repeats, so the induction-like score is undefined (blank)."


def load_app_module():
    """Import apps/explorer.py (the Gradio app) from the repository this package lives in."""
    if not APP_FILE.is_file():
        raise ModelNotFoundError(f"the explorer app is not at {APP_FILE}: run headlab from a checkout of the repo")
    spec = importlib.util.spec_from_file_location("headlab_explorer_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
