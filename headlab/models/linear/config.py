"""Configuration of headlab's linear-attention causal LMs (one model_type, a mixer kind per layer)."""

from __future__ import annotations

from transformers import PretrainedConfig

#: The per-layer sequence mixers. "softmax" is full causal softmax attention and "swa" the same over a
#: sliding window; the others are linear-attention forms with an implicit pattern (see mixer.py).
KINDS: tuple[str, ...] = ("softmax", "swa", "linear", "hedgehog", "based", "gla", "deltanet")
SOFTMAX_KINDS = frozenset({"softmax", "swa"})
LINEAR_KINDS = frozenset(KINDS) - SOFTMAX_KINDS
#: How a model knows token order (`HeadlabLinearConfig.position`).
POSITIONS: tuple[str, ...] = ("learned", "none", "rotary")


class HeadlabLinearConfig(PretrainedConfig):
    """A small causal LM whose layers each use one of `KINDS` (hybrid stacks allowed).

    Args:
        vocab_size: vocabulary (256 for the byte-level twins).
        hidden_size, num_hidden_layers, num_attention_heads: the usual geometry; head_dim defaults to
            hidden_size // num_attention_heads. Every kind has as many KV heads as query heads.
        intermediate_size: width of each layer's MLP; 0 builds attention-only layers.
        layer_kinds: one kind per layer, or a single kind for all layers.
        window: the sliding window (keys per query, the query included) of "swa" layers.
        based_feature_dim: q/k dimension of BASED layers before the 2nd-order Taylor map
            (1 + d + d² features); defaults to head_dim.
        hedgehog_feature_dim: width of Hedgehog's learned map per sign ([softmax(xW), softmax(−xW)]:
            2× this many features); defaults to head_dim.
        gla_gate_rank, gla_gate_normalizer: GLA's low-rank gate, log α = logsigmoid(W₂W₁x + b) / normalizer.
        linear_eps: the ε of the normalised linear forms, o = φ(q)S / (φ(q)·z + ε).
        position: how the model knows token order:
            - "learned" (the default, so saved models load unchanged): learned absolute position embeddings added to
              the token embeddings, shared by every kind; inputs may not exceed max_position_embeddings.
            - "none": no position signal at all. Linear kinds still carry order (a causal state that GLA decays and
              DeltaNet overwrites); softmax layers are then order-blind except through the causal mask.
            - "rotary": RoPE (Su et al. 2021) on the q and k of the softmax layers ("softmax", "swa"), so their scores
              depend on relative position only. Linear layers get no rotation (the same as "none" for them): RoPE
              before a positive feature map is not relative any more, and these kinds carry order in their recurrence.
            With "none" / "rotary" the length of an input is unlimited.
        max_position_embeddings: the number of learned positions (position "learned"; default 512). With another
            position it is informational only (default None, so `HeadModel.max_context` is unbounded).
        rope_theta: the RoPE base (position "rotary"): frequencies theta^(−2i/d) over the rotated head dim.
        moh_active_heads: Mixture-of-Head attention (Jin et al. 2024, "MoH"): each token turns on the top-K of the
            routed heads, K = this; 0 (the default) is plain multi-head attention. Only softmax layers ("softmax",
            "swa") route: MoH on a stack with a linear kind is refused. See `HeadlabLinearAttention.route`.
        moh_shared_heads: the first h_s heads of every layer are shared (always on, gated by a softmax router); the
            other H − h_s are routed. 0 (pure routing) is allowed; needs moh_active_heads ≥ 1.
        moh_balance_coef: weight of the load-balance loss added to the LM loss when labels are given
            (loss = cross-entropy + coef · mean over layers of L_b, as MoH's training code).
        short_conv: kernel size K of a short causal depthwise convolution (no bias, then SiLU, as fla's GLA / DeltaNet)
            on the q, k and v projections of every layer, whatever its kind, before feature maps and RoPE (conv.py);
            0 (the default, so saved models load unchanged) has none. It gives each token its K − 1 predecessors'
            features, so binding a key to the next token's value takes one layer (MQAR).
    """

    model_type = "headlab_linear"

    def __init__(self, vocab_size: int = 256, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, head_dim: int | None = None, intermediate_size: int = 0,
                 layer_kinds: str | list[str] | tuple[str, ...] = "linear", window: int = 16,
                 based_feature_dim: int | None = None, hedgehog_feature_dim: int | None = None,
                 gla_gate_rank: int = 16, gla_gate_normalizer: float = 16.0, linear_eps: float = 1e-6,
                 max_position_embeddings: int | None = None, position: str = "learned", rope_theta: float = 10000.0,
                 layer_norm_eps: float = 1e-5, initializer_range: float = 0.02,
                 tie_word_embeddings: bool = True, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, moh_active_heads: int = 0, moh_shared_heads: int = 0,
                 moh_balance_coef: float = 0.01, short_conv: int = 0, **kwargs) -> None:
        if isinstance(layer_kinds, str):
            layer_kinds = [layer_kinds] * num_hidden_layers
        layer_kinds = list(layer_kinds)
        unknown = [k for k in layer_kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown layer kind(s) {unknown}: choose from {', '.join(KINDS)}")
        if len(layer_kinds) != num_hidden_layers:
            raise ValueError(f"layer_kinds has {len(layer_kinds)} entries for {num_hidden_layers} layers")
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads "
                                 f"{num_attention_heads}: give head_dim")
            head_dim = hidden_size // num_attention_heads
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if position not in POSITIONS:
            raise ValueError(f"unknown position {position!r}: choose from {', '.join(POSITIONS)}")
        if position == "rotary" and head_dim % 2 and any(k in SOFTMAX_KINDS for k in layer_kinds):
            raise ValueError(f"position 'rotary' rotates pairs of q/k dimensions: head_dim {head_dim} must be even")
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {rope_theta!r}")
        if max_position_embeddings is None and position == "learned":
            max_position_embeddings = 512
        check_moh(num_attention_heads, layer_kinds, moh_active_heads, moh_shared_heads, moh_balance_coef)
        if isinstance(short_conv, bool) or int(short_conv) != short_conv or short_conv < 0:
            raise ValueError(f"short_conv is a kernel size (0 = no convolution): a non-negative integer, got "
                             f"{short_conv!r}")
        self.short_conv = int(short_conv)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.layer_kinds = layer_kinds
        self.window = window
        # read by headlab.stats (the 4-D mask matters only for windowed layers)
        self.sliding_window = window if "swa" in layer_kinds else None
        self.based_feature_dim = based_feature_dim or head_dim
        self.hedgehog_feature_dim = hedgehog_feature_dim or head_dim
        self.gla_gate_rank = gla_gate_rank
        self.gla_gate_normalizer = gla_gate_normalizer
        self.linear_eps = linear_eps
        self.moh_active_heads = int(moh_active_heads)
        self.moh_shared_heads = int(moh_shared_heads)
        self.moh_balance_coef = float(moh_balance_coef)
        self.max_position_embeddings = max_position_embeddings
        self.position = position
        self.rope_theta = float(rope_theta)
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def moh(self) -> bool:
        """Whether the layers are Mixture-of-Head layers (moh_active_heads > 0)."""
        return self.moh_active_heads > 0

    @property
    def moh_routed_heads(self) -> int:
        """h_r = H − h_s, the heads a MoH layer routes among (0 when MoH is off)."""
        return self.num_attention_heads - self.moh_shared_heads if self.moh else 0


def check_moh(heads: int, layer_kinds: list[str], active: int, shared: int, coef: float) -> None:
    """ValueError unless the MoH options fit the geometry (0 active heads: MoH off, nothing else may be set)."""
    for name, value in (("moh_active_heads", active), ("moh_shared_heads", shared)):
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not coef >= 0:
        raise ValueError(f"moh_balance_coef must be >= 0, got {coef!r}")
    if active == 0:
        if shared:
            raise ValueError(f"moh_shared_heads={shared} without moh_active_heads: MoH is on only when "
                             "moh_active_heads (the top-K of the routed heads) is >= 1")
        return
    if shared + active > heads:
        raise ValueError(f"moh_shared_heads {shared} + moh_active_heads {active} > {heads} heads: the top-K is taken "
                         f"among the {heads - shared} routed heads, so K must be <= num_attention_heads - "
                         "moh_shared_heads")
    linear = sorted({k for k in layer_kinds if k not in SOFTMAX_KINDS})
    if linear:
        raise ValueError(f"Mixture-of-Head routing is defined for softmax layers only (softmax, swa); this stack has "
                         f"{', '.join(linear)}: use MoH on a softmax stack")


#: The twins' layer stacks (`headlab train twins`, bundled names twin-<task>-<kind>). BASED pairs its Taylor linear
#: attention with sliding-window softmax, as the BASED architecture does (window layer first, so the global layer can
#: read the previous token).
STACKS: dict[str, tuple[str, ...]] = {
    "softmax": ("softmax", "softmax"),
    "linear": ("linear", "linear"),
    "hedgehog": ("hedgehog", "hedgehog"),
    "based": ("swa", "based"),
    "gla": ("gla", "gla"),
    "deltanet": ("deltanet", "deltanet"),
}

#: Mixture-of-Head twins (`headlab.models.linear.train.train_moh_pair`): softmax layers whose heads are routed per
#: token (the config's moh_* options). Kept apart from STACKS, which names the bundled twin-<task>-<kind> models.
MOH_STACKS: dict[str, tuple[str, ...]] = {
    "moh": ("softmax", "softmax"),
}


def twin_stack(kind: str) -> tuple[str, ...]:
    """The layer kinds of a twin kind: a key of STACKS or MOH_STACKS (ValueError naming both otherwise)."""
    if kind in STACKS:
        return STACKS[kind]
    if kind in MOH_STACKS:
        return MOH_STACKS[kind]
    raise ValueError(f"unknown twin kind {kind!r}: choose from {', '.join([*STACKS, *MOH_STACKS])}")
