"""Weights predict wiring: Q-, K- and V-composition scores between heads, and their rank-1 (Talking Heads) split.

Definitions (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; the matrix orders are those
of TransformerLens's `all_composition_scores`), in the residual basis with the row-vector convention `x W`:

* per head h: `W_QK^h = W_Q^h W_K^hᵀ` (d×d; the score of query x and key y is `x W_QK yᵀ`) and
  `W_OV^h = W_V^h W_O^h` (d×d; the head writes `x W_OV` for a source token x);
* the composition score of a matrix pair is `CS(A, B) = ‖A B‖_F / (‖A‖_F ‖B‖_F)`; of sender head A (earlier layer)
  into receiver head B:
    - Q-composition `CS(W_OV^A, W_QK^B)` (A's output feeds B's query side),
    - K-composition `CS(W_OV^A, W_QK^Bᵀ)` (A's output feeds B's key side),
    - V-composition `CS(W_OV^A, W_OV^B)` (A's output feeds B's values).
  In the paper's column convention these are ‖W_QKᵀ W_OV‖, ‖W_QK W_OV‖ and ‖W_OV^B W_OV^A‖.

Talking Heads (Merullo et al. 2024): the sender's `W_OV^A = Σ σ_i u_i v_iᵀ` is split into rank-1 components and
each gets its own score `CS(σ_i u_i v_iᵀ, R_B) = ‖v_iᵀ R_B‖ / ‖R_B‖` (R_B the receiver's matrix of the channel), so
a component that writes exactly where the receiver reads scores high whatever its σ. How much of the pair's
composition a component carries is `σ_i² CS_i² / Σ_j σ_j² CS_j²` (`component_shares`; these shares sum to 1,
because ‖W_OV^A R_B‖² = Σ_i σ_i² ‖v_iᵀ R_B‖² exactly).

What the weights are (`head_matrices`):

* the receiver-side pre-attention norm's gain (RMSNorm / LayerNorm weight of the layer that computes q, k, v; the
  decoder layer's attribute named in `PRE_ATTN_NORM`) is folded into W_Q, W_K and W_V as TransformerLens's
  `fold_ln` does: `W ← diag(g) W`. LayerNorm's centering (and TransformerLens's centering of writing weights) is
  ignored, as is the division by the RMS / standard deviation (a per-token scalar);
* RoPE is ignored: W_QK is the product of the unrotated projections (the true bilinear form depends on the
  query-key distance);
* biases are ignored (q/k/v/o biases, LayerNorm's bias): the scores are those of the linear maps only;
* grouped-query attention: a query head uses its KV group's W_K and W_V (`w_k` / `w_v` are expanded per query
  head, so heads of one group share them);
* every score is computed from low-rank factors, never a d×d matrix: with thin QRs `W_V = Q_V R_V` and
  `Y = Q_Y R_Y`, `W_OV = Q_V P` with `P = R_V W_O` (Dh×d) and a receiver matrix `X Yᵀ = Z Q_Yᵀ` with `Z = X R_Yᵀ`
  (d×Dh), so `CS = ‖P_A Z_B‖_F / (‖P_A‖_F ‖Z_B‖_F)`: one `[H·Dh, d] @ [d, N·Dh]` product per sender layer and
  channel covers all N later receivers.

Scores are 0 where the receiver's layer is not after the sender's (and where a head's matrix is 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from headlab.errors import HeadIndexError, UnsupportedModelError
from headlab.heads import HeadRef, as_heads, heads_per_group
from headlab.models.arch import Projections
from headlab.models.head_model import HeadModel
from headlab.results import ResultError, load_tensors, read_json, run_meta, save_tensors, write_json

CHANNELS = ("q", "k", "v")

# The pre-attention norm of each family: the attribute of the decoder layer (the attention module's parent) whose
# weight is the gain folded into W_Q, W_K, W_V.
PRE_ATTN_NORM: dict[str, str] = {
    "llama": "input_layernorm",
    "mistral": "input_layernorm",
    "qwen2": "input_layernorm",
    "gpt2": "ln_1",
    "headlab_linear": "ln_attn",
}

# Families whose ArchSpec carries no `projections` but whose softmax layers have separate q/k/v/o projections.
_PROJECTIONS_FALLBACK: dict[str, Projections] = {"headlab_linear": Projections("separate")}

# Layer kinds whose scores are a bilinear form of q and k (softmax attention, also within a sliding window).
_BILINEAR_KINDS = ("softmax", "swa")

# Elements of the largest intermediate of one block of receivers (float32: 256 MB).
_BLOCK_ELEMENTS = 1 << 26

SCORES_FILE = "composition.json"
TENSORS_FILE = "composition.safetensors"

NOTES = ("pre-attention norm gain folded into W_Q/W_K/W_V (LayerNorm centering ignored); RoPE ignored (unrotated "
         "W_QK); biases ignored; GQA: query heads use their KV group's W_K/W_V; scores are 0 where the receiver "
         "layer is not after the sender layer")


# ----------------------------------------------------------------------------------------------------------------
# per-head matrices


@dataclass
class HeadMatrices:
    """Per-head projection matrices of every layer (float32, on the CPU), in the row-vector convention `x W`.

    Attributes:
        w_q: per layer `[H, d, Dh]` (pre-attention norm gain folded in).
        w_k: per layer `[H, d, Dh]`, expanded per query head from its KV group (gain folded in).
        w_v: per layer `[H, d, Dh]`, expanded per query head from its KV group (gain folded in).
        w_o: per layer `[H, Dh, d]` (head h's rows of the output projection's input).
    """

    w_q: list[Tensor]
    w_k: list[Tensor]
    w_v: list[Tensor]
    w_o: list[Tensor]


def _projections(model: HeadModel) -> Projections:
    family = getattr(model.hf.config, "model_type", model.spec.family)
    proj = model.spec.projections or _PROJECTIONS_FALLBACK.get(family)
    if proj is None or family not in PRE_ATTN_NORM:
        supported = ", ".join(sorted(PRE_ATTN_NORM))
        raise UnsupportedModelError(f"composition scores support the families {supported}, not {family!r} (headlab "
                                    "needs its q/k/v/o projection layout and its pre-attention norm: add the family "
                                    "to headlab.circuits.composition.PRE_ATTN_NORM)")
    if getattr(model.hf.config, "headlab_pruned", None):
        raise UnsupportedModelError(f"{model.name} is structurally pruned: composition scores need every head's "
                                    "weights (compute them on the unpruned model)")
    if getattr(model.hf.config, "short_conv", 0):
        raise UnsupportedModelError(f"{model.name} convolves its q, k, v over the last {model.hf.config.short_conv} "
                                    "tokens (short_conv): a head's scores are not x W_QK yᵀ of one token's residual, "
                                    "so composition scores from W_Q, W_K, W_V would describe another model")
    bad = sorted({k for k in model.layer_kinds if k not in _BILINEAR_KINDS})
    if bad:
        raise UnsupportedModelError(f"{model.name} has {'/'.join(bad)} layers: W_QK is a bilinear form only for "
                                    "softmax attention (feature-mapped q/k have no residual-basis W_QK)")
    return proj


def _norm_gain(model: HeadModel, layer: int, attn: nn.Module, names: dict[int, str], d: int) -> Tensor:
    """The weight of the norm that feeds `layer`'s q/k/v (ones where the norm has no weight)."""
    family = getattr(model.hf.config, "model_type", model.spec.family)
    attr = PRE_ATTN_NORM[family]
    name = names[id(attn)]
    parent = model.hf.get_submodule(name.rsplit(".", 1)[0] if "." in name else "")
    norm = getattr(parent, attr, None)
    if norm is None:
        raise UnsupportedModelError(f"layer {layer} of {model.name}: the decoder layer {type(parent).__name__} has no "
                                    f"pre-attention norm {attr!r} (PRE_ATTN_NORM[{family!r}])")
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.ones(d)
    return weight.detach().float().cpu()


def _check_shape(model: HeadModel, layer: int, what: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise UnsupportedModelError(f"layer {layer} of {model.name}: {what} has shape {tuple(tensor.shape)}, "
                                    f"expected {shape} for {model.n_heads} heads × {model.head_dim} dims")


def _layer_matrices(model: HeadModel, layer: int, names: dict[int, str] | None = None) -> tuple[Tensor, ...]:
    """(w_q, w_k, w_v `[H, d, Dh]`, w_o `[H, Dh, d]`) of one layer, gain folded, float32 on the CPU."""
    proj = _projections(model)
    names = names if names is not None else {id(m): n for n, m in model.hf.named_modules()}
    attn = model.attention_module(layer)
    H, G, D = model.n_heads, model.n_kv_heads, model.head_dim
    per = heads_per_group(H, G)

    def weight(name: str) -> Tensor:
        return getattr(attn, name).weight.detach().float().cpu()

    if proj.kind == "separate":
        wq, wk, wv, wo = weight(proj.q), weight(proj.k), weight(proj.v), weight(proj.o)  # nn.Linear: [out, in]
        d = wq.shape[1]
        _check_shape(model, layer, proj.q, wq, (H * D, d))
        _check_shape(model, layer, proj.k, wk, (G * D, d))
        _check_shape(model, layer, proj.v, wv, (G * D, d))
        _check_shape(model, layer, proj.o, wo, (d, H * D))
        w_q = wq.view(H, D, d).transpose(1, 2)
        w_k = wk.view(G, D, d).transpose(1, 2).repeat_interleave(per, dim=0)
        w_v = wv.view(G, D, d).transpose(1, 2).repeat_interleave(per, dim=0)
        w_o = wo.view(d, H, D).permute(1, 2, 0)
    elif proj.kind == "fused_conv1d":
        fused, wo = weight(proj.qkv), weight(proj.o)  # Conv1D: [in, out]
        d = fused.shape[0]
        _check_shape(model, layer, proj.qkv, fused, (d, 3 * H * D))
        _check_shape(model, layer, proj.o, wo, (H * D, d))
        w_q, w_k, w_v = (fused[:, i * H * D:(i + 1) * H * D].reshape(d, H, D).permute(1, 0, 2) for i in range(3))
        w_o = wo.view(H, D, d)
    else:
        raise UnsupportedModelError(f"unknown projection layout {proj.kind!r}")
    gain = _norm_gain(model, layer, attn, names, d)
    if gain.shape != (d,):
        raise UnsupportedModelError(f"layer {layer} of {model.name}: the pre-attention norm's weight has shape "
                                    f"{tuple(gain.shape)}, expected ({d},)")
    g = gain[None, :, None]
    return ((w_q * g).contiguous(), (w_k * g).contiguous(), (w_v * g).contiguous(), w_o.contiguous())


def head_matrices(model: HeadModel) -> HeadMatrices:
    """Every head's W_Q, W_K, W_V `[H, d, Dh]` and W_O `[H, Dh, d]` per layer (see the module docstring).

    Args:
        model: a softmax-attention HeadModel of a family in `PRE_ATTN_NORM`.

    Returns:
        HeadMatrices (float32, on the CPU; norm gains folded into W_Q, W_K, W_V).

    Raises:
        UnsupportedModelError: a family without a known projection layout or pre-attention norm, a structurally
            pruned model, or linear-attention layers.
    """
    _projections(model)
    names = {id(m): n for n, m in model.hf.named_modules()}
    layers = [_layer_matrices(model, layer, names) for layer in range(model.n_layers)]
    return HeadMatrices(*(list(x) for x in zip(*layers)))


# ----------------------------------------------------------------------------------------------------------------
# low-rank algebra


def _r(x: Tensor) -> Tensor:
    """R of the thin QR of each `[..., m, n]` matrix: `x = Q R` with orthonormal Q, so ‖x C‖_F = ‖R C‖_F."""
    return torch.linalg.qr(x, mode="r").R


def _fro(x: Tensor) -> Tensor:
    return x.flatten(-2).norm(dim=-1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _channel(channel: str) -> str:
    c = channel.lower() if isinstance(channel, str) else channel
    if c not in CHANNELS:
        raise ValueError(f"unknown composition channel {channel!r}: use 'q', 'k' or 'v'")
    return c


def _receiver_factors(channel: str, w_q: Tensor, w_k: Tensor, w_v: Tensor, w_o: Tensor) -> tuple[Tensor, Tensor]:
    """(X, Y) with the receiver's matrix of the channel `= X Yᵀ` (all `[..., d, Dh]`)."""
    if channel == "q":
        return w_q, w_k  # W_QK
    if channel == "k":
        return w_k, w_q  # W_QKᵀ
    return w_v, w_o.transpose(-1, -2)  # W_OV


def _sender_factor(w_v: Tensor, w_o: Tensor) -> Tensor:
    """P `[..., k, d]` with `W_OV = W_V W_O = Q P` (Q orthonormal columns): ‖W_OV M‖_F = ‖P M‖_F for every M."""
    return _r(w_v) @ w_o


def _receiver_factor(channel: str, w_q: Tensor, w_k: Tensor, w_v: Tensor, w_o: Tensor) -> Tensor:
    """Z `[..., d, k']` with the channel's receiver matrix `X Yᵀ = Z Qᵀ` (Q orthonormal columns): ‖M X Yᵀ‖ = ‖M Z‖."""
    x, y = _receiver_factors(channel, w_q, w_k, w_v, w_o)
    return x @ _r(y).transpose(-1, -2)


def _scores_block(p_s: Tensor, z_r: Tensor) -> Tensor:
    """CS of senders into receivers, `‖P_A Z_B‖_F / (‖P_A‖_F ‖Z_B‖_F)`: p_s `[S, k, d]`, z_r `[N, d, k']` → `[S, N]`.

    One `[S·k, d] @ [d, N·k']` product, then each `k × k'` block's norm.
    """
    S, k, d = p_s.shape
    N, _, k2 = z_r.shape
    cross = p_s.reshape(S * k, d) @ z_r.permute(1, 0, 2).reshape(d, N * k2)  # [S·k, N·k']
    num = cross.square().view(S, k, N, k2).sum(dim=(1, 3)).sqrt()
    return _ratio(num, _fro(p_s)[:, None] * _fro(z_r)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# results


def _ref(head: Any) -> HeadRef:
    refs = as_heads(head) if isinstance(head, (HeadRef, str)) else as_heads([head])
    if len(refs) != 1:
        raise HeadIndexError(f"expected one head, got {head!r}")
    return refs[0]


@dataclass(repr=False)
class CompositionScores:
    """Q-, K- and V-composition scores of every (sender, receiver) head pair of a model.

    Attributes:
        q: `[L, H, L, H]` float32 Q-composition: [sender layer, sender head, receiver layer, receiver head]; 0 where
            the receiver's layer is not after the sender's.
        k: `[L, H, L, H]` K-composition, likewise.
        v: `[L, H, L, H]` V-composition, likewise.
        baseline: the mean score of random Gaussian matrices of the same shapes per channel (`"q"`, `"k"`, `"v"`),
            their standard deviations (`"q_std"`, ...), and `"samples"` / `"seed"` (Elhage et al. subtract it).
        meta: the model and run facts (name, geometry, time taken, what the weights are).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    baseline: dict
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.q, self.k, self.v)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(f"q, k and v must share one [L, H, L, H] shape, got {sorted(shapes)}")
        L, H, L2, H2 = next(iter(shapes))
        if (L, H) != (L2, H2):
            raise ValueError(f"q, k and v must be [L, H, L, H], got {(L, H, L2, H2)}")

    def __repr__(self) -> str:
        L, H = self.q.shape[:2]
        name = self.meta.get("model_name", "?")
        return f"CompositionScores({name}: {L} layers × {H} heads, baseline q/k/v " + \
            "/".join(f"{self.baseline.get(c, float('nan')):.3f}" for c in CHANNELS) + ")"

    @property
    def n_layers(self) -> int:
        """L, the number of layers."""
        return int(self.q.shape[0])

    @property
    def n_heads(self) -> int:
        """H, query heads per layer."""
        return int(self.q.shape[1])

    def channel(self, channel: str) -> Tensor:
        """The `[L, H, L, H]` scores of one channel ("q", "k" or "v").

        Args:
            channel: "q", "k" or "v".

        Returns:
            The channel's tensor (not a copy).

        Raises:
            ValueError: an unknown channel.
        """
        return getattr(self, _channel(channel))

    def score(self, sender: Any, receiver: Any, channel: str) -> float:
        """The score of one (sender, receiver, channel) triple.

        Args:
            sender: the sending head (HeadRef, (layer, head) or "L0H2").
            receiver: the receiving head.
            channel: "q", "k" or "v".

        Returns:
            The score (0 when the receiver's layer is not after the sender's).

        Raises:
            ValueError: an unknown channel.
            HeadIndexError: a head out of range.
        """
        s, r = self._check(sender), self._check(receiver)
        return float(self.channel(channel)[s.layer, s.head, r.layer, r.head])

    def _check(self, head: Any) -> HeadRef:
        ref = _ref(head)
        if ref.layer >= self.n_layers or ref.head >= self.n_heads:
            raise HeadIndexError(f"head {ref} is out of range: these scores have layers 0..{self.n_layers - 1} and "
                                 f"heads 0..{self.n_heads - 1}")
        return ref

    def _head_mask(self, heads: Iterable[Any] | None) -> Tensor:
        if heads is None:
            return torch.ones(self.n_layers, self.n_heads, dtype=torch.bool)
        refs = [self._check(h) for h in ([heads] if isinstance(heads, (HeadRef, str)) else heads)]
        mask = torch.zeros(self.n_layers, self.n_heads, dtype=torch.bool)
        for ref in refs:
            mask[ref.layer, ref.head] = True
        return mask

    def valid(self) -> Tensor:
        """`[L, H, L, H]` bool: pairs whose receiver layer is after the sender layer.

        Returns:
            A bool tensor (an expanded view).
        """
        L, H = self.n_layers, self.n_heads
        later = torch.arange(L)[:, None] < torch.arange(L)[None, :]
        return later[:, None, :, None].expand(L, H, L, H)

    def top_edges(self, k: int, channel: str | None = None, *, receivers: Iterable[Any] | None = None,
                  senders: Iterable[Any] | None = None) -> list[tuple[HeadRef, HeadRef, str, float]]:
        """The k highest-scoring (sender, receiver, channel, score) edges, best first.

        Args:
            k: how many (fewer when fewer pairs qualify).
            channel: "q", "k" or "v"; None ranks the three channels together (by raw score: the three baselines
                are equal in distribution for equal shapes).
            receivers: restrict to these receiving heads (HeadRefs, (layer, head) pairs or "L3H1" strings).
            senders: restrict to these sending heads.

        Returns:
            [(sender, receiver, channel, score)], best first.

        Raises:
            ValueError: an unknown channel or a k that is not a positive int.
            HeadIndexError: a head out of range.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        channels = CHANNELS if channel is None else (_channel(channel),)
        pair = self.valid() & self._head_mask(senders)[:, :, None, None] & self._head_mask(receivers)[None, None]
        flat = torch.cat([torch.where(pair, self.channel(c), float("-inf")).flatten() for c in channels])
        k = min(k, int(pair.sum()) * len(channels))
        if k == 0:
            return []
        values, idx = flat.topk(k)
        n = self.q.numel()
        L, H = self.n_layers, self.n_heads
        out = []
        for value, i in zip(values.tolist(), idx.tolist()):
            c, rest = divmod(i, n)
            sl, rest = divmod(rest, H * L * H)
            sh, rest = divmod(rest, L * H)
            rl, rh = divmod(rest, H)
            out.append((HeadRef(sl, sh), HeadRef(rl, rh), channels[c], float(value)))
        return out

    def save(self, path: str | Path) -> Path:
        """Write `composition.safetensors`, then `composition.json` (the commit marker) into the folder `path`.

        Args:
            path: the folder (created if needed).

        Returns:
            The folder, as a Path.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(folder / TENSORS_FILE, {"q": self.q, "k": self.k, "v": self.v})
        write_json(folder / SCORES_FILE, {"analysis": "composition", "shape": list(self.q.shape),
                                          "baseline": self.baseline, "meta": self.meta})
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "CompositionScores":
        """Scores written by `save`.

        Args:
            path: the folder `save` wrote.

        Returns:
            The CompositionScores.

        Raises:
            ResultError: a part missing or unreadable, or not a composition result (the message names the file).
        """
        folder = Path(path)
        data = read_json(folder / SCORES_FILE)
        tensors_path = folder / TENSORS_FILE
        if not tensors_path.is_file():
            raise ResultError(f"{tensors_path} does not exist (an interrupted save?)")
        tensors = load_tensors(tensors_path)
        try:
            if data.get("analysis") != "composition":
                raise ValueError("not a composition result")
            out = cls(q=tensors["q"], k=tensors["k"], v=tensors["v"], baseline=dict(data["baseline"]),
                      meta=dict(data.get("meta", {})))
            if list(out.q.shape) != list(data["shape"]):
                raise ValueError(f"tensors {list(out.q.shape)} do not match the recorded shape {data['shape']}")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ResultError(f"{folder / SCORES_FILE} is not a headlab composition result ({err!r})") from err
        return out


# ----------------------------------------------------------------------------------------------------------------
# computation


def random_baseline(d: int, head_dim: int, *, samples: int = 256, seed: int = 0, chunk: int = 32,
                    qk_dim: int | None = None) -> dict:
    """Mean (and std) composition score of random Gaussian matrices of a model's shapes, per channel.

    Every factor (W_Q, W_K `[d, qk_dim]`, W_V `[d, Dh]`, W_O `[Dh, d]`) is drawn i.i.d. N(0, 1) (the score is
    scale-invariant), each channel from its own seeded stream, and scored with the same formula as the model.

    Args:
        d: the residual width.
        head_dim: Dh of W_V and W_O.
        samples: random (sender, receiver) pairs per channel.
        seed: the base seed (each channel its own stream).
        chunk: pairs scored at a time.
        qk_dim: the width of W_Q, W_K (default: head_dim).

    Returns:
        {"q", "k", "v": mean scores; "q_std", "k_std", "v_std"; "samples"; "seed"}.
    """
    qk_dim = qk_dim or head_dim
    out: dict[str, Any] = {}
    for ci, channel in enumerate(CHANNELS):
        gen = torch.Generator().manual_seed(seed * 1009 + ci)
        vals = []
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            w_v = torch.randn(n, d, head_dim, generator=gen)
            w_o = torch.randn(n, head_dim, d, generator=gen)
            w_q = torch.randn(n, d, qk_dim, generator=gen)
            w_k = torch.randn(n, d, qk_dim, generator=gen)
            w_vb = torch.randn(n, d, head_dim, generator=gen)
            w_ob = torch.randn(n, head_dim, d, generator=gen)
            p, z = _sender_factor(w_v, w_o), _receiver_factor(channel, w_q, w_k, w_vb, w_ob)
            vals.append(_ratio(_fro(p @ z), _fro(p) * _fro(z)))
        vals = torch.cat(vals).double()
        out[channel] = float(vals.mean())
        out[f"{channel}_std"] = float(vals.std())
    out.update(samples=samples, seed=seed)
    return out


def composition_scores(model: HeadModel, *, progress: bool = True, baseline_samples: int = 256,
                       seed: int = 0) -> CompositionScores:
    """Q-, K- and V-composition scores of every sender → receiver head pair of `model`.

    Args:
        model: a HeadModel of a family in `PRE_ATTN_NORM` with softmax attention layers.
        progress: show a tqdm bar over sender layers.
        baseline_samples: random matrix pairs per channel for the baseline.
        seed: the baseline's seed.

    Returns:
        CompositionScores with q, k, v `[L, H, L, H]`, the random baseline and meta (time taken in `seconds`).

    Raises:
        UnsupportedModelError: see `head_matrices`.
    """
    start = time.perf_counter()
    mats = head_matrices(model)
    L, H, D = model.n_layers, model.n_heads, model.head_dim
    w_q, w_k, w_v, w_o = (torch.stack(x) for x in (mats.w_q, mats.w_k, mats.w_v, mats.w_o))  # [L, H, ...]
    d = w_q.shape[2]
    p = _sender_factor(w_v, w_o)  # [L, H, k, d]
    z = {c: _receiver_factor(c, w_q, w_k, w_v, w_o) for c in CHANNELS}  # [L, H, d, k']
    out = {c: torch.zeros(L, H, L, H) for c in CHANNELS}
    k = p.shape[2]
    step = max(1, _BLOCK_ELEMENTS // (H * H * k * k))  # receiver layers per block (bounds the product's memory)
    with torch.no_grad():
        for ls in tqdm(range(L - 1), desc="composition (sender layers)", disable=not progress, leave=False):
            for c in CHANNELS:
                for l0 in range(ls + 1, L, step):
                    l1 = min(L, l0 + step)
                    block = _scores_block(p[ls], z[c][l0:l1].reshape(-1, *z[c].shape[2:]))
                    out[c][ls, :, l0:l1, :] = block.view(H, l1 - l0, H)
    compute_s = time.perf_counter() - start
    baseline = random_baseline(d, D, samples=baseline_samples, seed=seed)
    family = getattr(model.hf.config, "model_type", model.spec.family)
    meta = run_meta(model, model_name=model.name, family=family, d_model=d, pre_attn_norm=PRE_ATTN_NORM[family],
                    numerics=NOTES, seconds=round(compute_s, 3),
                    seconds_with_baseline=round(time.perf_counter() - start, 3))
    return CompositionScores(q=out["q"], k=out["k"], v=out["v"], baseline=baseline, meta=meta)


def _pair(model: HeadModel, sender: Any, receiver: Any, channel: str) -> tuple[HeadRef, HeadRef, str]:
    s, r = _ref(sender), _ref(receiver)
    model.check_heads([s, r])
    c = _channel(channel)
    if r.layer <= s.layer:
        raise ValueError(f"receiver {r} must be in a later layer than sender {s}: only earlier heads compose into "
                         "later ones")
    return s, r, c


def _components(model: HeadModel, sender: HeadRef, receiver: HeadRef, channel: str) -> tuple[Tensor, Tensor]:
    """(σ `[k]` descending, per-component CS `[k]`) of the sender's W_OV against the receiver (float64)."""
    names = {id(m): n for n, m in model.hf.named_modules()}
    sv, so = (t[sender.head].double() for t in _layer_matrices(model, sender.layer, names)[2:])
    rq, rk, rv, ro = (t[receiver.head].double() for t in _layer_matrices(model, receiver.layer, names))
    # W_OV^A = V O = (Q_v R_v)(R_oᵀ Q_oᵀ) = Q_v U Σ Wᵀ Q_oᵀ: right singular vectors (what it writes) = Q_o W
    r_v = _r(sv)
    q_o, r_o = torch.linalg.qr(so.T)
    _, sigma, wh = torch.linalg.svd(r_v @ r_o.T)
    writes = q_o @ wh.T  # [d, k]: column i is v_i
    x, y = _receiver_factors(channel, rq, rk, rv, ro)
    r_y = _r(y)
    num = _fro((writes.T @ x)[:, None, :] @ r_y.T[None])  # ‖v_iᵀ X R_Yᵀ‖ = ‖v_iᵀ X Yᵀ‖
    den = _fro(_r(x) @ r_y.T)
    cs = _ratio(num, den.expand_as(num))
    tol = sigma.max().clamp_min(0) * max(sigma.shape[0], x.shape[0]) * torch.finfo(torch.float32).eps
    return sigma, torch.where(sigma > tol, cs, torch.zeros_like(cs))


def _rank(rank: int | None, k: int) -> int:
    if rank is None:
        return k
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ValueError(f"rank must be an int in 1..{k} (the sender's W_OV has at most {k} components), got {rank!r}")
    return rank


def talking_heads(model: HeadModel, sender: Any, receiver: Any, channel: str, *, rank: int | None = None) -> Tensor:
    """Per-component composition scores of the sender's rank-1 W_OV components into the receiver (Talking Heads).

    Component i of `W_OV^A = Σ σ_i u_i v_iᵀ` scores `CS(σ_i u_i v_iᵀ, R) = ‖v_iᵀ R‖_F / ‖R‖_F` with R the receiver's
    W_QK (channel "q"), W_QKᵀ ("k") or W_OV ("v"); components with σ_i = 0 score 0. `component_shares` says how much
    of the pair's composition each carries.

    Args:
        model: the HeadModel.
        sender: the sending head (HeadRef, (layer, head) or "L0H2").
        receiver: the receiving head; its layer must come after the sender's.
        channel: "q", "k" or "v".
        rank: keep the first `rank` components (None: all, min(d, Dh)).

    Returns:
        float32 `[rank]`, ordered by descending singular value.

    Raises:
        ValueError: unknown channel, a receiver not after the sender, or a bad rank.
        HeadIndexError: a head out of range.
    """
    s, r, c = _pair(model, sender, receiver, channel)
    sigma, cs = _components(model, s, r, c)
    return cs[:_rank(rank, sigma.shape[0])].float()


def component_shares(model: HeadModel, sender: Any, receiver: Any, channel: str, *,
                     rank: int | None = None) -> Tensor:
    """Each rank-1 component's share of the pair's composition, `σ_i² CS_i² / Σ_j σ_j² CS_j²` (sums to 1 over all).

    Args:
        model: the HeadModel.
        sender: the sending head (HeadRef, (layer, head) or "L0H2").
        receiver: the receiving head; its layer must come after the sender's.
        channel: "q", "k" or "v".
        rank: keep the first `rank` components (None: all).

    Returns:
        float32 `[rank]`, ordered by descending singular value (all zero when the pair does not compose);
        concentration in one component: `shares.max()`.

    Raises:
        ValueError: unknown channel, a receiver not after the sender, or a bad rank.
        HeadIndexError: a head out of range.
    """
    s, r, c = _pair(model, sender, receiver, channel)
    sigma, cs = _components(model, s, r, c)
    energy = (sigma * cs) ** 2
    total = energy.sum()
    shares = energy / total if total > 0 else torch.zeros_like(energy)
    return shares[:_rank(rank, sigma.shape[0])].float()


def precision_at_k(scores: CompositionScores, edges: set[tuple[Any, Any, str]], k: int,
                   channel: str | None = None, *, senders: Iterable[Any] | None = None,
                   receivers: Iterable[Any] | None = None) -> float:
    """The share of the top-k scored (sender, receiver, channel) triples that are in `edges`.

    Args:
        scores: the composition scores.
        edges: the known edges as (sender, receiver, channel) triples (heads in any form `as_heads` reads).
        k: how many top triples to check (the share is over those that exist when fewer pairs qualify; NaN when no
            pair does, e.g. a one-layer model).
        channel: rank only this channel (None: the three together).
        senders: rank only triples with these senders (e.g. a circuit's heads, when `edges` come from path
            patching among them).
        receivers: rank only triples with these receivers.

    Returns:
        The share in [0, 1], or NaN.

    Raises:
        ValueError: an unknown channel (in `channel` or an edge) or a bad k.
        HeadIndexError: a head out of range.
    """
    known = {(scores._check(s), scores._check(r), _channel(c)) for s, r, c in edges}
    top = scores.top_edges(k, channel, senders=senders, receivers=receivers)
    if not top:
        return math.nan
    return sum((s, r, c) in known for s, r, c, _ in top) / len(top)
