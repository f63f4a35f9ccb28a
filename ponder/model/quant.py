"""Weight dtypes: fp32 (exact), bf16/fp16 (half-width weights and activations), int8 (lossy).

``int8`` replaces every projection and the LM head with PyTorch's dynamically quantized linear (int8 weights,
per-channel scales, activations quantized per call; fbgemm on x86 CPUs). The embedding stays fp32, so with tied
embeddings the head gets its own int8 copy. Quantized modes are lossy: the bench reports their fidelity.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ponder.model.llama import LlamaModel

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert_dtype(model: LlamaModel, dtype: str) -> LlamaModel:
    """Cast (fp32, bf16, fp16) or quantize (int8) the weights."""
    if dtype in FLOAT_DTYPES:
        return model.to(FLOAT_DTYPES[dtype])
    if dtype == "int8":
        return quantize_int8(model)
    raise ValueError(f"unknown dtype {dtype}")


def quantize_int8(model: LlamaModel) -> LlamaModel:
    """Swap every ``nn.Linear`` (projections and head) for an int8 dynamically quantized one, in place."""
    if model.config.tie_word_embeddings:
        head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
        head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone(), requires_grad=False)
        model.lm_head = head
    _to_plain_linears(model)
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" in engines:
        torch.backends.quantized.engine = "fbgemm"
    elif "qnnpack" in engines:
        torch.backends.quantized.engine = "qnnpack"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its future move to torchao
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _to_plain_linears(model: nn.Module) -> None:
    """quantize_dynamic only swaps modules whose type is exactly ``nn.Linear``: hand it plain ones."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and type(child) is not nn.Linear:
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
