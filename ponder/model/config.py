"""Model hyperparameters, read from a Hugging Face ``config.json`` dict.

One dataclass covers the Llama family: Llama 2/3 (incl. rope scaling), SmolLM/SmolLM2, Mistral, Qwen2 (qkv bias).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ponder.errors import PonderError, UnsupportedArchitecture

SUPPORTED_MODEL_TYPES: dict[str, bool] = {  # model_type -> q/k/v projections carry a bias
    "llama": False,
    "mistral": False,
    "qwen2": True,
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise PonderError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a ``config.json`` dict; raises ``UnsupportedArchitecture`` for anything else."""
        model_type = cfg.get("model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ",".join(cfg.get("architectures") or []) or model_type
            raise UnsupportedArchitecture(
                f"unsupported architecture {archs} (model_type={model_type!r}); ponder supports the Llama "
                f"family: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            rope_scaling, rope_theta = _rope_params(cfg)
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                attention_bias=bool(cfg.get("attention_bias", SUPPORTED_MODEL_TYPES[model_type])),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                sliding_window=_sliding_window(cfg),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PonderError(f"config.json is missing or has a bad value for {e}; is it a decoder-only LM config?")


def _rope_params(cfg: dict[str, Any]) -> tuple[dict[str, Any] | None, float]:
    """(rope_scaling or None, rope_theta). Newer transformers write both into ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params or None
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
    return scaling, theta


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:
        return None
    return int(window) if window else None
