"""Tiny random Llama-family checkpoints written in-process (no downloads), for tests.

``make_model_dir`` saves a transformers model built from a small config (random weights) plus a small word-level
tokenizer with a chat template, so both ponder and transformers can load the same directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WORDS = (
    "the a an of to and in is it that was he she they we you for on with as at by from this have not but or "
    "be are his her their our your one two three four five six seven eight nine ten sea sky blue red green "
    "cat dog bird fish tree river mountain city house road car train ship king queen story poem song answer "
    "question number paris france london rome water fire earth wind light dark day night sun moon star"
).split()
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

BASE_CONFIG: dict[str, Any] = {
    "vocab_size": len(SPECIALS) + len(WORDS) + 3,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def make_tokenizer(path: Path) -> None:
    """A word-level tokenizer over ``WORDS`` with a chat template, saved in ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def make_model_dir(path: Path, model_type: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a random ``model_type`` checkpoint (config.json, model.safetensors, tokenizer) into ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(BASE_CONFIG, **overrides)
    config = AutoConfig.for_model(model_type, **cfg)
    config.architectures = [ARCHS[model_type]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # default init is tiny; larger weights make logits (and tests) more discriminating
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(path), safe_serialization=True)
    make_tokenizer(path)
    return path


def hf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
