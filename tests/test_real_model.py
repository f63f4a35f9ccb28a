"""The real default model, SmolLM2-135M-Instruct, against transformers on the same weights."""

import pytest
import torch

import ponder
from ponder.model.loader import eos_token_ids

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a short poem about the sea and explain its imagery.",
    "Summarize: The city council met on Tuesday to discuss new bike lanes. Residents praised safer routes to "
    "school, while shop owners worried about parking. The council agreed to a six-month trial on two streets.",
    "Tom has 12 apples. He gives a third of them to Ann and eats 2. How many are left? Think step by step.",
]


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2.path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chats(smollm2) -> list[list[int]]:
    engine = ponder.Engine(smollm2)
    return [engine.encode([{"role": "user", "content": p}]) for p in PROMPTS]


def test_logits_match_transformers(smollm2, hf, chats) -> None:
    ids = torch.tensor([chats[0]])
    with torch.inference_mode():
        expected = hf(ids).logits
        got = smollm2.model(ids, smollm2.model.new_cache(1, ids.shape[1]))
    assert (expected - got).abs().max().item() <= 1e-4


def test_greedy_128_tokens_equal_hf_generate(smollm2, hf, chats) -> None:
    engine = ponder.Engine(smollm2)
    eos = sorted(eos_token_ids(smollm2.path, smollm2.model.config, smollm2.tokenizer))
    params = ponder.SamplingParams(max_new_tokens=128)
    ours = engine.generate(chats, params)  # one ragged batch of 3
    for prompt, got in zip(chats, ours):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=128, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos[0])
        expected = out[0, len(prompt) :].tolist()
        assert got.output_ids == expected
        assert len(expected) >= 40  # real answers, not an immediate EOS


def test_long_greedy_run_without_eos(smollm2, hf, chats) -> None:
    """128 tokens past any EOS, so the comparison covers the whole length."""
    engine = ponder.Engine(smollm2)
    got = engine.generate([chats[1]], ponder.SamplingParams(max_new_tokens=160, ignore_eos=True))[0]
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = hf.generate(torch.tensor([chats[1]]), max_new_tokens=160, min_new_tokens=160, do_sample=False,
                          pad_token_id=0)
    assert got.output_ids == out[0, len(chats[1]) :].tolist()


def test_ragged_batch_equals_single_prompts(smollm2, chats) -> None:
    engine = ponder.Engine(smollm2)
    params = ponder.SamplingParams(max_new_tokens=48, ignore_eos=True)
    prompts = chats + [chats[0][:-3], chats[2][:9]]  # 5 rows: the batched (packed) kernel path
    alone = [engine.generate([p], params)[0].output_ids for p in prompts]
    assert [c.output_ids for c in engine.generate(prompts, params)] == alone


@pytest.mark.parametrize("dtype, bound", [("int8", 0.97), ("q4", 0.98)])
def test_quantized_top1_agreement(smollm2, chats, dtype: str, bound: float) -> None:
    """Teacher-forced on fp32's greedy outputs: q4 runs the GGUF's own 4-bit blocks (fp32 is them dequantized),
    int8 rounds the dequantized weights again."""
    engine = ponder.Engine(smollm2)
    quant = ponder.load(dtype=dtype).model
    agree = total = 0
    for prompt in chats:
        out = engine.generate([prompt], ponder.SamplingParams(max_new_tokens=64, ignore_eos=True))[0].output_ids
        ids = torch.tensor([prompt + out])
        with torch.inference_mode():
            predicted = quant(ids, quant.new_cache(1, ids.shape[1]))[0, len(prompt) - 1 : -1].argmax(-1)
        agree += int((predicted == torch.tensor(out)).sum())
        total += len(out)
    assert agree / total >= bound


def test_q4_weights_are_the_gguf_blocks(smollm2) -> None:
    """Each 4-bit projection of the default model against the fp32 one (the same GGUF blocks dequantized by gguf):
    off by no more than the bf16 rounding of each block's scale and zero."""
    q4 = ponder.load(dtype="q4").model
    for i in (0, 17, 29):
        for ref, got in ((smollm2.model.layers[i].attn.wqkv, q4.layers[i].attn.wqkv),
                         (smollm2.model.layers[i].mlp.wdown, q4.layers[i].mlp.wdown)):
            w = ref.weight
            assert (got.dequantized() - w).abs().max().item() <= 2**-7 * w.abs().max().item()
