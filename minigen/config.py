"""Model configuration: one dataclass for both architectures, built from a Hugging Face
config.json (or from GGUF metadata by the loader).

Shape letters (used across minigen): B batch, T tokens in cache, H query heads, Hkv kv heads,
D head dim, C model dim, F MLP hidden dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minigen.errors import ConfigError

SUPPORTED_ARCHS = ("llama", "opt")
_ARCH_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "OPTForCausalLM": "opt"}


@dataclass(slots=True)
class ModelConfig:
    arch: str                      # "llama" (Llama, Mistral, Qwen2) | "opt"
    vocab_size: int                # V
    dim: int                       # C
    num_layers: int
    num_heads: int                 # H
    num_kv_heads: int              # Hkv (== H for MHA and OPT)
    hidden_dim: int                # F, MLP inner size
    max_seq_len: int               # the model's context length
    head_dim: int = 0              # D; 0 means dim // num_heads
    norm_eps: float = 1e-5
    # llama
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # HF rope_scaling dict; rope_type "llama3" supported
    tie_embeddings: bool = False
    qkv_bias: bool = False         # q/k/v projection biases (Qwen2, OPT)
    o_bias: bool = False           # output projection bias (OPT)
    mlp_bias: bool = False
    # opt
    do_layer_norm_before: bool = True   # False: post-LN (opt-350m)
    word_embed_proj_dim: int = 0        # != dim: project_in/project_out exist
    has_final_layer_norm: bool = True
    activation: str = "silu"            # llama: silu (SwiGLU); opt: relu
    # special tokens (the tokenizer may refine these)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # a sliding attention window (Mistral) the context was capped to, so attention over the whole
    # context is exactly the model's windowed attention; None: no window
    sliding_window: int | None = None

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture '{self.arch}': minigen runs {', '.join(SUPPORTED_ARCHS)} models")
        if self.head_dim == 0:
            if self.dim % self.num_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.dim // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.word_embed_proj_dim == 0:
            self.word_embed_proj_dim = self.dim
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"rope_scaling type '{kind}' is not supported (supported: llama3)")
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")

    @property
    def sm_scale(self) -> float:
        """Attention logit scale D^-0.5 (Llama and OPT alike)."""
        return self.head_dim ** -0.5

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Map a Hugging Face config.json dict onto ModelConfig. Fields that change the computation
        and that minigen does not implement are refused (ConfigError), never ignored."""
        _refuse_unimplemented(cfg)
        mt = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        try:
            # model_type names the family; a config without one, its class names (exactly: Qwen2Moe
            # or Qwen2VL share a prefix with Qwen2 but not its weights)
            family = mt or next((_ARCH_FAMILY[a] for a in archs if a in _ARCH_FAMILY), None)
            if family in ("llama", "mistral", "qwen2"):
                nh = cfg["num_attention_heads"]
                qwen2 = family == "qwen2"                                     # q/k/v biases, no o bias
                ctx, window = _window(cfg, cfg.get("max_position_embeddings", 2048))
                return cls(
                    arch="llama", vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
                    num_layers=cfg["num_hidden_layers"], num_heads=nh,
                    num_kv_heads=cfg.get("num_key_value_heads") or nh,
                    hidden_dim=cfg["intermediate_size"],
                    max_seq_len=ctx, sliding_window=window,
                    head_dim=cfg.get("head_dim") or 0, norm_eps=cfg.get("rms_norm_eps", 1e-6),
                    rope_theta=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
                    rope_scaling=_rope_scaling(cfg),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                    qkv_bias=qwen2 or bool(cfg.get("attention_bias", False)),
                    o_bias=not qwen2 and bool(cfg.get("attention_bias", False)),
                    mlp_bias=bool(cfg.get("mlp_bias", False)),
                    activation=cfg.get("hidden_act", "silu"),
                    bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)
            if family == "opt":
                nh = cfg["num_attention_heads"]
                return cls(
                    arch="opt", vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
                    num_layers=cfg["num_hidden_layers"], num_heads=nh, num_kv_heads=nh,
                    hidden_dim=cfg["ffn_dim"], max_seq_len=cfg.get("max_position_embeddings", 2048),
                    norm_eps=1e-5, qkv_bias=bool(cfg.get("enable_bias", True)), o_bias=bool(cfg.get("enable_bias", True)),
                    mlp_bias=bool(cfg.get("enable_bias", True)),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                    do_layer_norm_before=bool(cfg.get("do_layer_norm_before", True)),
                    word_embed_proj_dim=cfg.get("word_embed_proj_dim") or cfg["hidden_size"],
                    has_final_layer_norm=bool(cfg.get("do_layer_norm_before", True))
                    and not cfg.get("_remove_final_layer_norm", False),
                    activation=cfg.get("activation_function", "relu"),
                    bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)
        except KeyError as e:
            raise ConfigError(f"config.json is missing field {e}; is this a complete Hugging Face model?") from None
        raise ConfigError(
            f"unsupported architecture '{mt}' ({', '.join(archs) or 'no architectures listed'}): "
            f"minigen runs {', '.join(SUPPORTED_ARCHS)} models")


# config.json fields that change the math, minigen implements none of them: (field, what it is,
# the value that means "off")
_UNIMPLEMENTED = (
    ("attn_logit_softcapping", "attention logit softcapping", None),
    ("final_logit_softcapping", "final logit softcapping", None),
    ("query_pre_attn_scalar", "a query scale other than head_dim^-0.5", None),
    ("use_qk_norm", "q/k normalization", False),
    ("qk_layernorm", "q/k normalization", False),
    ("partial_rotary_factor", "partial rotary embeddings", 1.0),
    ("embedding_multiplier", "a scaled embedding", 1.0),
    ("residual_multiplier", "scaled residuals", 1.0),
    ("logits_scaling", "scaled logits", 1.0),
)


def _refuse_unimplemented(cfg: dict) -> None:
    for key, what, off in _UNIMPLEMENTED:
        if cfg.get(key, off) not in (off, None):
            raise ConfigError(f"config.json sets {key}={cfg[key]!r} ({what}), which minigen does not implement; "
                              f"it would compute something else than this model")


def _window(cfg: dict, ctx: int) -> tuple[int, int | None]:
    """(context, window): a sliding attention window shorter than the context caps the context, where
    full attention over every cached token is exactly the model's windowed attention."""
    window = cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False or window >= ctx:
        return ctx, None
    if not isinstance(window, int) or window < 2:
        raise ConfigError(f"config.json has sliding_window={window!r}; expected an integer >= 2")
    return window, window


def _rope_scaling(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling")
    if rs is None:  # transformers >= 5 writes rope_parameters instead
        rp = cfg.get("rope_parameters") or {}
        if rp.get("rope_type", "default") != "default":
            rs = rp
    if rs is not None and rs.get("rope_type", rs.get("type")) in ("default", None):
        return None
    return rs
