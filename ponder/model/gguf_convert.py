"""Convert a llama.cpp GGUF file into a Hugging Face-style directory (config.json, model.safetensors, tokenizer).

Quantized GGUF tensors are dequantized once to fp32 with the ``gguf`` package; the result is cached, so the next
load reads plain safetensors. llama.cpp stores the Llama family's Q/K projection rows permuted for its rotary
layout; they are permuted back here so the weights match the Hugging Face layout exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ponder.errors import PonderError, UnsupportedArchitecture

GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}  # GGUF general.architecture -> HF model_type
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) from the GGUF file at ``path``."""
    reader = _open(path)
    meta = _metadata(reader)
    arch = str(meta.get("general.architecture", "?"))
    if arch not in GGUF_ARCHS:
        raise UnsupportedArchitecture(
            f"unsupported architecture {arch!r} in {path.name}; ponder supports GGUF architectures {sorted(GGUF_ARCHS)}"
        )
    config = _hf_config(meta, arch, {t.name for t in reader.tensors})
    tmp = Path(tempfile.mkdtemp(prefix=".ponder-convert-", dir=out_dir.parent))
    try:
        tensors = {name: tensor for name, tensor in _hf_tensors(reader, config, path)}
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": path.name})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _save_tokenizer(path, tmp)
        _publish(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished conversion ``tmp`` to ``out_dir`` in one step, so a half-written one is never taken for
    a cache hit. Where another process published the same conversion first, its directory stays (it may be
    reading it); a leftover without config.json (from an older ponder, or a user's copy) is moved aside under a
    name of its own before it is deleted, so no other process's finished directory is ever deleted."""
    for _ in range(3):
        try:
            os.rename(tmp, out_dir)  # fails where out_dir exists and is not empty
            return
        except OSError:
            if (out_dir / "config.json").is_file():
                return
            if not out_dir.exists():
                continue  # removed meanwhile: try again
            aside = Path(tempfile.mkdtemp(prefix=".ponder-leftover-", dir=out_dir.parent))
            try:
                os.rename(out_dir, aside / "old")
            except FileNotFoundError:
                pass  # another process moved it first: the next try tells
            except OSError as e:  # not ours to move (permissions, a mount point): say so
                shutil.rmtree(aside, ignore_errors=True)
                raise PonderError(f"cannot replace {out_dir} (an incomplete conversion without config.json): "
                                  f"{e.strerror or e}; remove it and try again") from None
            shutil.rmtree(aside, ignore_errors=True)
    raise PonderError(f"cannot write the converted model to {out_dir}: another process keeps replacing it")


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ... on bad bytes
        raise PonderError(f"cannot read GGUF file {path}: it is truncated or corrupt ({type(e).__name__}: {e})")


def _metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "token_type", "merges", "scores"):
            meta[key + ".count"] = len(field.data)
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # a field type this gguf version cannot decode is not one we need
            continue
    return meta


def _hf_config(meta: dict[str, Any], arch: str, tensor_names: set[str]) -> dict[str, Any]:
    p = arch + "."
    try:
        heads = int(meta[p + "attention.head_count"])
        hidden = int(meta[p + "embedding_length"])
        config = {
            "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
            "model_type": GGUF_ARCHS[arch],
            "vocab_size": int(meta.get(p + "vocab_size") or meta["tokenizer.ggml.tokens.count"]),
            "hidden_size": hidden,
            "intermediate_size": int(meta[p + "feed_forward_length"]),
            "num_hidden_layers": int(meta[p + "block_count"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
            "head_dim": int(meta.get(p + "rope.dimension_count", hidden // heads)),
            "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
            "rms_norm_eps": float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }
    except KeyError as e:
        raise PonderError(f"GGUF metadata lacks {e}; the file is incomplete or not a decoder LM")
    if arch == "qwen2":
        config["attention_bias"] = True
    return config


def _hf_tensors(reader: Any, config: dict[str, Any], path: Path):
    """Yield (HF name, fp32 tensor) for every GGUF tensor."""
    from gguf.quants import dequantize

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for t in reader.tensors:
        name = _hf_name(t.name)
        shape = [int(d) for d in reversed(t.shape)]
        try:
            array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except Exception as e:
            raise PonderError(f"cannot decode tensor {t.name} of {path.name} ({t.tensor_type.name}): {e}")
        w = torch.from_numpy(array.copy())
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute(w, heads if "q_proj" in name else kv_heads)
        yield name, w.contiguous()


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        base = LAYER_NAMES.get(parts[2])
        if base is None:
            raise PonderError(f"unexpected GGUF tensor {gguf_name}: not a Llama-family layer weight")
        return f"model.layers.{parts[1]}.{base}.{parts[-1]}"
    if parts[0] not in TOP_NAMES:
        raise PonderError(f"unexpected GGUF tensor {gguf_name}")
    return f"{TOP_NAMES[parts[0]]}.{parts[-1]}"


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of rotary pairs in a Q/K projection # [H*D, E]."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _save_tokenizer(path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise PonderError(f"cannot build a tokenizer from {path.name}: {type(e).__name__}: {e}")
    tok.save_pretrained(str(out_dir))
