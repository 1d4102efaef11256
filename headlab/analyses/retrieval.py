"""Retrieval heads (Wu et al. 2024): a needle-in-a-haystack copy-paste harness and the retrieval score.

A needle sentence is inserted at a depth into a haystack (public-domain KJV text under
data/haystacks/), the model is asked a question whose answer is in the needle, and it answers by
greedy decoding with a KV cache. As in the authors' code (nightdessert/Retrieval_Head):
- the prompt's last token is the first decode step's input (not prefilled): every token comes from a
  one-query step; decoding stops at EOS, at a newline after some text (theirs: at any newline) or
  after `max_new_tokens` (50);
- at each decode step, for every head, the top-1 key of the decode row (`headlab_kernels.head_stats`, O(S)):
  if it lies in the needle span and the token just generated equals the prompt token there, the
  head earns 1 / |span|;
- the needle span is the first window of |answer| tokens whose token-set overlap with the answer's
  tokens exceeds 0.9 (the answer is tried as tokenised alone and after a space);
- a trial counts only if the reply recalls the answer (ROUGE-1 recall > 0.5; words are lowercased
  alphanumeric runs, without the Porter stemmer of the `rouge_score` package); a head's retrieval
  score is its mean over the counted trials.
Edits under test (head masking, KV policies) are active during decoding only: the prefill is shared
by all conditions of a trial and its cache is copied for each. That is the paper's masking choice
(heads masked during decoding) and RazorAttention's (the cache is compressed after prefill).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from headlab.analyses.razor import (
    Condition,
    RazorParams,
    RetrievalReport,
    echo_induction_scan,
    masking_conditions,
    razor_conditions,
    retrieval_kv_heads,
    summarize,
)
from headlab.edits.heads import edit
from headlab.edits.razor_cache import RazorCache
from headlab.errors import PromptError
from headlab.models.head_model import HeadModel
from headlab.models.loading import worker_source
from headlab.paths import HAYSTACKS_DIR
from headlab.results import append_jsonl, HeadScores, params_dict, read_jsonl, run_meta
from headlab_kernels.head_stats import head_stats

HAYSTACKS = HAYSTACKS_DIR


@dataclass(frozen=True)
class NeedleSet:
    """One (needle, question, answer, haystack text) set; `answer` is the part of the needle to recall.

    Attributes:
        needle: the sentence hidden in the haystack.
        question: the question asked after the context.
        answer: the part of the needle a reply must recall.
        haystack: the haystack text.
    """

    needle: str
    question: str
    answer: str
    haystack: str


def needle_sets(folder: str | Path = HAYSTACKS) -> list[NeedleSet]:
    """The needle sets of `folder/needles.json`, with their haystack texts read.

    Args:
        folder: the folder holding needles.json and the haystack files.

    Returns:
        The NeedleSets, in file order.
    """
    folder = Path(folder)
    data = json.loads((folder / "needles.json").read_text())
    return [NeedleSet(s["needle"], s["question"], s["answer"], (folder / s["haystack"]).read_text())
            for s in data["sets"]]


@dataclass(frozen=True)
class NeedlePrompt:
    """Prompt token ids `[T]`, the needle span [start, end) in them, and the answer's recall units (words or ids).

    Attributes:
        ids: the prompt's token ids.
        span: (start, end) of the answer's tokens in `ids`.
        reference: the answer's recall units: words (text models) or token ids.
    """

    ids: tuple[int, ...]
    span: tuple[int, int]
    reference: tuple[Any, ...]


def words(text: str) -> list[str]:
    """ROUGE-style unigrams: lowercased runs of letters and digits.

    Args:
        text: any text.

    Returns:
        The unigrams, in order.
    """
    return re.findall(r"[a-z0-9]+", text.lower())


def recall(reference: Iterable[Any], candidate: Iterable[Any]) -> float:
    """ROUGE-1 recall: the share of the reference's unigrams (with multiplicity) found in the candidate.

    Args:
        reference: the reference's units (words or ids).
        candidate: the reply's units.

    Returns:
        The recall in [0, 1] (0 for an empty reference).
    """
    ref, cand = Counter(reference), Counter(candidate)
    total = sum(ref.values())
    return sum(min(n, cand[w]) for w, n in ref.items()) / total if total else 0.0


def find_span(ids: list[int] | tuple[int, ...], answers: list[list[int]], threshold: float = 0.9) -> tuple[int, int]:
    """The first window [i, i + len(a)) whose token set overlaps answer a's set by more than `threshold`.

    Args:
        ids: the prompt's token ids.
        answers: candidate tokenisations of the answer.
        threshold: the overlap a window must exceed.

    Returns:
        (start, end) of the window.

    Raises:
        PromptError: no window overlaps enough.
    """
    for i in range(len(ids)):
        for ans in answers:
            want = set(ans)
            if want and len(set(ids[i:i + len(ans)]) & want) / len(want) > threshold:
                return i, i + len(ans)
    raise PromptError("the needle's answer was not found in the prompt (token-set overlap <= 0.9 everywhere)")


def text_prompt(model: HeadModel, needle: NeedleSet, length: int, depth: float, *,
                chat: bool | None = None) -> NeedlePrompt:
    """A prompt of about `length` tokens: the needle at `depth` percent of a trimmed haystack, then the question.

    The insertion point moves back to a sentence end (a token holding "."). With the chat template
    (`chat=None`: when the tokenizer has one) the user turn is "<book>{context}</book>\\nBased on
    the content of the book, Question: {q}\\nAnswer:"; without it the text is context + that question.
    `length` counts the whole prompt (the authors' code trims the context to length - 200 instead).

    Args:
        model: a HeadModel with a tokenizer.
        needle: the needle set.
        length: the prompt's length in tokens.
        depth: where the needle goes, in percent of the haystack.
        chat: use the chat template (None: when the tokenizer has one).

    Returns:
        The NeedlePrompt (ids, the answer's span, its words).

    Raises:
        PromptError: no tokenizer, a length that leaves no room for the haystack, or an answer not found in the
            prompt.
    """
    tok = model.tokenizer
    if tok is None:
        raise PromptError(f"{model.name} has no tokenizer: build NeedlePrompt ids yourself for text-free models")
    question = f"Based on the content of the book, Question: {needle.question}\nAnswer:"
    use_chat = getattr(tok, "chat_template", None) is not None if chat is None else chat

    def encode(context: str) -> list[int]:
        if not use_chat:
            return tok(context + question)["input_ids"]
        text = tok.apply_chat_template([{"role": "user", "content": f"<book>{context}</book>\n{question}"}],
                                       tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    hay = tok(needle.haystack[:8 * length], add_special_tokens=False)["input_ids"]  # KJV: ~4 characters a token
    needle_ids = tok(" " + needle.needle.strip() + " ", add_special_tokens=False)["input_ids"]
    budget = length - len(encode("")) - len(needle_ids)
    if budget < 1 or len(hay) < budget:
        raise PromptError(f"a {length}-token prompt leaves {budget} haystack tokens (the haystack has {len(hay)})")
    hay = hay[:budget]
    at = len(hay) if depth >= 100 else int(len(hay) * depth / 100)
    while at > 0 and "." not in tok.decode([hay[at - 1]]):
        at -= 1
    ids = encode(tok.decode(hay[:at] + needle_ids + hay[at:]))
    answers = [tok(a, add_special_tokens=False)["input_ids"] for a in (needle.answer, " " + needle.answer)]
    return NeedlePrompt(tuple(ids), find_span(ids, answers), tuple(words(needle.answer)))


def greedy_decode(model: HeadModel, cache: Any, first: int, *, max_new_tokens: int, stop: set[int],
                  on_step: Callable[[int], None] = lambda token: None) -> list[int]:
    """Greedy decoding from a prefilled cache, feeding `first`; `on_step(token)` runs after each step.

    Decoding stops at a stop token, after `max_new_tokens`, or at a newline once the reply has text.

    Args:
        model: the HeadModel (active edits apply to each step).
        cache: the prefilled cache (updated in place by the model).
        first: the first token fed (the prompt's last).
        max_new_tokens: the most tokens generated.
        stop: token ids that end the reply (not included).
        on_step: called with each generated token.

    Returns:
        The generated token ids.
    """
    out, token = [], first
    for _ in range(max_new_tokens):
        logits, cache = model.forward_cached(torch.tensor([[token]], device=model.device), cache)
        token = int(logits.argmax())
        on_step(token)
        if token in stop:
            break
        out.append(token)
        tok = model.tokenizer
        if tok is not None and "\n" in tok.decode([token]) and tok.decode(out).strip():
            break
    return out


def run_trial(model: HeadModel, prompt: NeedlePrompt, conditions: list[Condition], *, max_new_tokens: int = 50,
              recall_threshold: float = 0.5) -> list[dict[str, Any]]:
    """Prefill once, then decode under each condition from a copy of the cache; one record per condition.

    A record holds the reply, its recall, whether it counts (recall > threshold), the KV fraction kept
    (KV policies) and, for a scoring condition, the per-head retrieval score `[L, H]` of the trial.

    Args:
        model: a causal LM HeadModel.
        prompt: the trial's NeedlePrompt.
        conditions: the decoding conditions.
        max_new_tokens: the most tokens generated per reply.
        recall_threshold: a reply counts when its recall exceeds this.

    Returns:
        One record per condition: condition, spec, reply, generated, recall, found, prompt_tokens, span, seconds,
        and kv / scores where they apply.
    """
    ids = list(prompt.ids)
    start, end = prompt.span
    eos = [getattr(model.hf.config, "eos_token_id", None), getattr(model.tokenizer, "eos_token_id", None)]
    stop = {i for e in eos for i in (e if isinstance(e, (list, tuple)) else [e]) if isinstance(i, int)}
    # scoring and masking read each decode row over every key: recurrent (linear) layers must keep their keys
    keep = any(c.score or c.mask for c in conditions)
    with torch.no_grad():
        _, cache = model.forward_cached(torch.tensor([ids[:-1]], device=model.device), keep_keys=keep)
    prompt_ids = torch.tensor(ids)
    records = []
    for cond in conditions:
        t0 = time.perf_counter()
        score = torch.zeros(model.n_layers, model.n_heads)  # [L, H]
        idx = torch.full((model.n_layers, model.n_heads), -1)  # [L, H]: the top-1 key of each head's decode row

        def top1(record) -> None:  # a Capture callback, on one-query forwards: O(S) per head
            if record.q.shape[2] != 1:
                return
            if record.linear:  # a linear layer: its implicit row over every cached key (its mixer's pattern)
                row = record.pattern()[:1, :, 0].abs()  # [1, H, S]
                idx[record.layer] = row.argmax(-1)[0].cpu()
                return
            st = head_stats(record.q[:1], record.k[:1], scale=record.scale, causal=True, topk=1)
            idx[record.layer] = st.topk_idx[0, :, 0, 0].cpu()

        def on_step(token: int) -> None:
            hit = (idx >= start) & (idx < end) & (prompt_ids[idx.clamp(0, len(ids) - 1)] == token)
            score.add_(hit, alpha=1.0 / (end - start))

        scope = model.capturing(keep=False, callback=top1) if cond.score else contextlib.nullcontext()
        start_cache = copy.deepcopy(cache)
        if cond.real_cache and cond.kv_policy is not None:  # the policy as a real cache: compressed at the first step
            start_cache = RazorCache.from_cache(model, cond.policy(len(ids) - 1), start_cache)
        with torch.no_grad(), edit(model, cond.edits(len(ids) - 1)), scope:
            gen = greedy_decode(model, start_cache, ids[-1], max_new_tokens=max_new_tokens, stop=stop,
                                on_step=on_step)
        reply = model.tokenizer.decode(gen, skip_special_tokens=True).strip() if model.tokenizer else ""
        got = recall(prompt.reference, words(reply) if model.tokenizer else gen)
        rec: dict[str, Any] = {"condition": cond.name, "spec": cond.spec, "reply": reply, "generated": gen,
                               "recall": got, "found": got > recall_threshold, "prompt_tokens": len(ids),
                               "span": [start, end], "seconds": round(time.perf_counter() - t0, 3)}
        if cond.kv_policy is not None and cond.real_cache:  # what the cache really held at the end, and its bytes
            rec["kv"] = {**start_cache.fraction(), "kept_bytes": start_cache.nbytes()}
        elif cond.kv_policy is not None:
            rec["kv"] = cond.policy(len(ids) - 1).cache_fraction(model, len(ids) + len(gen))
        if cond.score:
            rec["scores"] = score.tolist()
        records.append(rec)
    return records


@dataclass(frozen=True)
class Trial:
    """One grid point: needle set, prompt length (tokens) and depth (percent); `key` names it in trials.jsonl.

    Attributes:
        needle: the needle set's index.
        length: the prompt length in tokens.
        depth: the needle's depth in percent.
    """

    needle: int
    length: int
    depth: float

    @property
    def key(self) -> str:
        """`n{needle}-L{length}-d{depth}`."""
        return f"n{self.needle}-L{self.length}-d{self.depth:g}"


@dataclass
class TrialWorker:
    """Decodes one trial's missing conditions: `(trial, conditions)` → records (`run_trial`).

    Attributes:
        model: a causal LM HeadModel (in the worker's process).
        make_prompt: builds a trial's NeedlePrompt.
        max_new_tokens: the most tokens generated per reply.
        recall_threshold: a reply counts when its recall exceeds this.
    """

    model: HeadModel
    make_prompt: Callable[[Trial], NeedlePrompt]
    max_new_tokens: int = 50
    recall_threshold: float = 0.5

    def __call__(self, job: tuple[Trial, list[Condition]]) -> list[dict[str, Any]]:
        """The records of `job[1]`'s conditions on trial `job[0]`."""
        trial, conditions = job
        return run_trial(self.model, self.make_prompt(trial), conditions, max_new_tokens=self.max_new_tokens,
                         recall_threshold=self.recall_threshold)


@dataclass(frozen=True)
class TrialWorkerSpec:
    """A picklable recipe for a TrialWorker in another process (a Ray actor).

    The worker loads `source` and builds the KJV needle prompts (`text_prompt`) itself.

    Attributes:
        source: the model's bundled name or folder.
        chat: use the chat template (None: when the tokenizer has one).
        max_new_tokens: the most tokens generated per reply.
        recall_threshold: a reply counts when its recall exceeds this.
    """

    source: str
    chat: bool | None = None
    max_new_tokens: int = 50
    recall_threshold: float = 0.5

    def __call__(self) -> TrialWorker:
        """Load the model and return the worker."""
        from headlab.models import load

        model, sets = load(self.source), needle_sets()
        return TrialWorker(model, lambda t: text_prompt(model, sets[t.needle], t.length, t.depth, chat=self.chat),
                           self.max_new_tokens, self.recall_threshold)


def run_grid(model: HeadModel, make_prompt: Callable[[Trial], NeedlePrompt], trials: list[Trial],
             conditions: list[Condition], *, path: str | Path | None = None, tag: str = "",
             max_new_tokens: int = 50, recall_threshold: float = 0.5, progress: bool = True,
             executor: Any = None, worker: Callable[[], TrialWorker] | None = None) -> list[dict[str, Any]]:
    """Run every (trial, condition) not already in the JSONL file at `path`; return all their records.

    Records are appended (one line each, flushed) as trials finish, so an interrupted run resumes
    where it stopped. A record is reused only if its trial key, `tag` (the decoding settings) and
    condition spec all match.

    Args:
        model: a causal LM HeadModel.
        make_prompt: builds a trial's NeedlePrompt.
        trials: the grid points.
        conditions: the decoding conditions.
        path: the JSONL file of records (None: nothing written or reused).
        tag: the decoding settings, part of each record's key.
        max_new_tokens: the most tokens generated per reply.
        recall_threshold: a reply counts when its recall exceeds this.
        progress: show a progress bar.
        executor: where trials run (`headlab.executors`): None / local (here, on `model` with `make_prompt`), or a
            RayExecutor, whose workers are built by `worker` (a picklable factory, e.g. `TrialWorkerSpec`); records
            are written here as trials finish either way.
        worker: the factory of the workers of a non-local executor.

    Returns:
        The records of every (trial, condition), trials in order, with trial, needle, length and depth added.

    Raises:
        PromptError: a non-local executor without a `worker` factory.
    """
    path = Path(path) if path is not None else None
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in read_jsonl(path) if path is not None else []:  # a line cut short by an interrupted run is skipped
        if isinstance(rec, dict) and "trial" in rec and "spec" in rec:
            done[(rec["trial"], rec["spec"])] = rec
    keys = [f"{t.key}|{tag}" for t in trials]
    todo = [(t, k) for t, k in zip(trials, keys) if any((k, c.spec) not in done for c in conditions)]
    bar = tqdm(total=len(todo), desc=f"needles {model.name}", disable=not progress, leave=False)
    key_of = {t: k for t, k in todo}

    def finish(job: tuple[Trial, list[Condition]], recs: list[dict[str, Any]]) -> None:
        trial, key = job[0], key_of[job[0]]
        for rec in recs:
            rec.update(trial=key, needle=trial.needle, length=trial.length, depth=trial.depth)
            done[(key, rec["spec"])] = rec
        if path is not None:  # one line per record; a line cut short by an interruption is ended first
            append_jsonl(path, recs)
        bar.set_postfix_str(trial.key)
        bar.update(1)

    jobs = [(t, [c for c in conditions if (k, c.spec) not in done]) for t, k in todo]
    if executor is None or executor.name == "local":
        for job in jobs:
            finish(job, TrialWorker(model, make_prompt, max_new_tokens, recall_threshold)(job))
    elif worker is None:
        raise PromptError(f"a {executor.name} executor needs a worker factory (TrialWorkerSpec): custom prompts "
                          "cannot travel to other processes")
    else:
        executor.run(worker, jobs, finish)
    bar.close()
    return [done[(k, c.spec)] for k in keys for c in conditions]


def retrieval_scores(model: HeadModel, records: list[dict[str, Any]], *, params: dict | None = None) -> HeadScores:
    """Retrieval score `[L, H]`: the mean of the trial scores over the trials whose reply counts.

    Maps: "retrieval" (primary). Items: "trial_scores" `[N, L, H]` and "found" `[N]` over all scored trials.

    Args:
        model: the HeadModel the records come from.
        records: trial records, the scoring condition's carrying "scores".
        params: the settings to record (a dict).

    Returns:
        HeadScores (analysis "retrieval").
    """
    scored = [r for r in records if "scores" in r]
    trial = torch.tensor([r["scores"] for r in scored]).view(-1, model.n_layers, model.n_heads)
    found = torch.tensor([bool(r["found"]) for r in scored], dtype=torch.bool)
    mean = trial[found].mean(0) if bool(found.any()) else torch.zeros(model.n_layers, model.n_heads)
    meta = run_meta(model, n_trials=len(scored), n_counted=int(found.sum()),
                    share_above_0_1=float((mean > 0.1).float().mean()),
                    share_above_0_5=float((mean > 0.5).float().mean()))
    return HeadScores(analysis="retrieval", model=model.name, maps={"retrieval": mean}, primary="retrieval",
                      params=params or {}, meta=meta, items={"trial_scores": trial, "found": found})


@dataclass(frozen=True, kw_only=True)
class RetrievalParams:
    """Settings of `retrieval_scan`: the needle grid, decoding, the masking test and the KV policies.

    Attributes:
        lengths: the grid's context lengths (tokens).
        depths: the grid's needle depths (percent).
        needles: the grid's needle sets.
        max_new_tokens: the most tokens decoded per reply.
        chat: use the chat template (None: when the tokenizer has one; see `text_prompt`).
        recall_threshold: a reply counts when its ROUGE-1 recall exceeds this.
        ks: the masking test's K values (see `razor.masking_conditions`); ks=(): no masking test.
        draws: random draws per K.
        mask_how: "uniform" or "zero" masking.
        exclude_top: the share of top heads random draws avoid.
        seed: the draws' seed.
        mask_lengths: the lengths the masking test runs at (empty: all).
        windows: RazorAttention's recent windows S0 (one condition each; (): none).
        window_frac: 1/C (the window grows with the context).
        sinks: N0, the first tokens every head keeps.
        kv_cache: "simulated" (the RazorKV edit over the full cache), "real" (a RazorCache holding only the kept
            entries) or "both" (each window both ways; the real conditions' names end in "-real").
        razor: the echo/induction scan that picks the retrieval KV heads kept full.
    """

    lengths: tuple[int, ...] = (512, 1024)
    depths: tuple[float, ...] = (10.0, 50.0, 90.0)
    needles: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 50
    chat: bool | None = None
    recall_threshold: float = 0.5
    ks: tuple[int, ...] = (5, 10, 20)
    draws: int = 3
    mask_how: str = "uniform"
    exclude_top: float = 0.1
    mask_lengths: tuple[int, ...] = ()
    windows: tuple[int, ...] = (64, 256)
    window_frac: float = 0.0
    sinks: int = 4
    kv_cache: str = "simulated"
    razor: RazorParams = field(default_factory=RazorParams)
    seed: int = 0


def retrieval_scan(model: HeadModel, params: RetrievalParams = RetrievalParams(), *, out: str | Path | None = None,
                   make_prompt: Callable[[Trial], NeedlePrompt] | None = None,
                   progress: bool = True, executor: Any = None) -> RetrievalReport:
    """Retrieval scores on the needle grid, then top-K vs random-K masking and RazorAttention against full cache.

    Phase 1 decodes each trial under the baseline (scored) and the KV policies (retrieval KV heads from
    the echo/induction scan); phase 2, under the masking conditions built from phase 1's scores. With
    `out`, trials go to `out/trials.jsonl` as they finish and a rerun skips them.

    Args:
        model: a causal LM HeadModel.
        params: the needle grid, decoding, masking test and KV policies (`RetrievalParams`).
        out: a folder for the trial log and the echo/induction scan (reused by a rerun with the same settings).
        make_prompt: builds a trial's NeedlePrompt (default: `text_prompt` on the KJV needle sets).
        progress: show progress bars.
        executor: where the trials run (`headlab.executors`; None: here). A Ray executor's workers load the model
            from its name or folder and build the KJV prompts themselves (so not with a custom `make_prompt`).

    Returns:
        A RetrievalReport: retrieval scores (HeadScores), the echo/induction scan, per-trial records and the
        per-condition summary (recall under masking and KV policies).

    Raises:
        UnsupportedModelError: a non-local executor for a model loaded from an object (workers cannot load it).
        PromptError: not a causal LM, no tokenizer (with the default prompts), unknown needle sets, or lengths
            longer than the model's context.
    """
    start = time.perf_counter()
    if not model.causal or not model.is_lm:
        raise PromptError(f"{model.name} is not a causal LM: the needle test decodes a reply, so it needs one")
    remote = executor is not None and executor.name != "local"
    if remote and make_prompt is not None:
        raise PromptError("custom needle prompts (make_prompt) cannot travel to other processes: run them here")
    source = worker_source(model, executor.name) if remote else None
    if make_prompt is None:
        if model.tokenizer is None:
            raise PromptError(f"{model.name} has no tokenizer: the needle prompts are text")
        sets = needle_sets()
        bad = [n for n in params.needles if not 0 <= n < len(sets)]
        if bad:
            raise PromptError(f"needle set(s) {bad} do not exist: data/haystacks/needles.json has 0..{len(sets) - 1}")
        too_long = [n for n in params.lengths if model.max_context is not None and n > model.max_context]
        if too_long:
            raise PromptError(f"lengths {too_long} exceed {model.name}'s context of {model.max_context} tokens")
        make_prompt = lambda t: text_prompt(model, sets[t.needle], t.length, t.depth, chat=params.chat)  # noqa: E731
    out = Path(out) if out is not None else None
    razor_dir = out / "razor" if out is not None else None
    razor = HeadScores.load(razor_dir) if razor_dir is not None and (razor_dir / "scores.json").exists() else None
    if razor is None or razor.params != params_dict(params.razor):
        razor = echo_induction_scan(model, params.razor, progress=progress)
        if razor_dir is not None:
            razor.save(razor_dir)
    trials = [Trial(n, length, float(d)) for n in params.needles for length in params.lengths for d in params.depths]
    grid = dict(path=out / "trials.jsonl" if out is not None else None, progress=progress,
                tag=f"m{params.max_new_tokens}-c{params.chat}",
                max_new_tokens=params.max_new_tokens, recall_threshold=params.recall_threshold, executor=executor,
                worker=TrialWorkerSpec(source, params.chat, params.max_new_tokens, params.recall_threshold)
                if remote else None)
    phase1 = [Condition(name="baseline", score=True)] + razor_conditions(
        retrieval_kv_heads(razor), params.windows, sinks=params.sinks, window_frac=params.window_frac,
        kv_cache=params.kv_cache)
    records = run_grid(model, make_prompt, trials, phase1, **grid)
    scores = retrieval_scores(model, records, params=params_dict(params))
    if params.ks:
        phase2 = masking_conditions(scores, params.ks, draws=params.draws, how=params.mask_how,
                                    exclude_top=params.exclude_top, seed=params.seed)
        masked = [t for t in trials if not params.mask_lengths or t.length in params.mask_lengths]
        records += run_grid(model, make_prompt, masked, phase2, **grid)
    summary = summarize(records)
    scores.meta.update(summary=summary, retrieval_kv=sorted(retrieval_kv_heads(razor)),
                       seconds=round(time.perf_counter() - start, 1))
    report = RetrievalReport(scores, razor, records, summary, params.mask_how)
    if out is not None:
        report.save(out)
    return report
