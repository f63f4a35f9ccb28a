"""Our model against transformers' implementation of the same weights, and generation against HF generate."""

from pathlib import Path

import pytest
import torch

from ponder.engine import Engine
from ponder.model.loader import load_model
from ponder.model.rope import inv_frequencies
from ponder.sampling import SamplingParams
from tinymodel import hf_model, make_model_dir

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
ARCH_CASES = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2-bias": ("qwen2", {}),
    "tied": ("llama", {"tie_word_embeddings": True}),
    "mha": ("llama", {"num_key_value_heads": 4}),
}


@pytest.fixture(scope="module", params=list(ARCH_CASES))
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model_type, overrides = ARCH_CASES[request.param]
    path = make_model_dir(tmp_path_factory.mktemp(request.param), model_type, **overrides)
    return request.param, path, hf_model(path), load_model(path)


def test_logits_match_transformers(arch) -> None:
    name, _, hf, ours = arch
    ids = torch.randint(5, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(ids).logits
        got = ours(ids, ours.new_cache(2, 32))
    assert (expected - got).abs().max().item() <= 1e-4, name


def test_scaling_and_window_are_really_applied(arch) -> None:
    """Guards the exactness test above against both sides silently ignoring a config field."""
    name, _, _, ours = arch
    cfg = ours.config
    plain = inv_frequencies(cfg.head_dim, cfg.rope_theta, None)
    scaled = "rope" in name
    assert (not torch.equal(ours.inv_freq, plain)) == scaled
    assert (cfg.sliding_window == 8) == (name == "mistral-window")
    assert cfg.attention_bias == (name == "qwen2-bias")


def test_incremental_decode_equals_full_forward(arch) -> None:
    _, _, _, ours = arch
    ids = torch.randint(5, ours.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = ours(ids, ours.new_cache(1, 32))
        cache = ours.new_cache(1, 32)
        steps = [ours(ids[:, :12], cache)] + [ours(ids[:, i : i + 1], cache) for i in range(12, 20)]
    assert cache.lengths == [20]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_greedy_equals_hf_generate(arch) -> None:
    name, path, hf, ours = arch
    import ponder

    engine = Engine(ponder.load(str(path)))
    hf.generation_config.eos_token_id = None  # both sides run the full length, EOS included as a plain token
    for seed in range(3):
        g = torch.Generator().manual_seed(10 + seed)
        prompt = torch.randint(5, ours.config.vocab_size, (1, 5 + 4 * seed), generator=g)
        with torch.inference_mode():
            out = hf.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
        got = engine.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
        assert len(got.output_ids) == 40
        assert got.output_ids == out[0, prompt.shape[1] :].tolist(), (name, seed)


@pytest.mark.parametrize("batch", [3, 6])  # 6 rows take the packed batched kernel (>= 4 rows)
def test_ragged_batch_equals_single_prompts(tiny, batch: int) -> None:
    engine = Engine(tiny)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(5, tiny.model.config.vocab_size, (3 + 5 * i,), generator=g).tolist() for i in range(batch)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    alone = [engine.generate([p], params)[0].output_ids for p in prompts]
    together = [c.output_ids for c in engine.generate(prompts, params)]
    assert together == alone


def test_rows_finishing_early_leave_the_others_exact(tiny) -> None:
    """Rows that hit a stop string leave the batch at different steps (6 -> 3 rows, crossing the packed kernel's
    4-row threshold); every row, survivors included, must equal its one-row run with the same parameters."""
    engine = Engine(tiny)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, tiny.model.config.vocab_size, (3 + 4 * i,), generator=g).tolist() for i in range(6)]
    budget = SamplingParams(max_new_tokens=30, ignore_eos=True)
    # rows 0, 2, 4 stop at the word pair they write at steps 3, 8 and 14 (or sooner, if it came earlier)
    stops = tuple(" ".join(engine.generate([prompts[r]], budget)[0].text.split()[t - 2 : t])
                  for r, t in ((0, 3), (2, 8), (4, 14)))
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, stop=stops)
    alone = [engine.generate([p], params)[0] for p in prompts]
    early = sorted(len(c.output_ids) for c in alone if c.finish_reason == "stop")
    assert len(early) >= 3 and len(set(early)) >= 2 and max(early) < 30, early  # rows really leave, at various steps
    assert sum(c.finish_reason == "length" for c in alone) >= 2, [c.finish_reason for c in alone]  # survivors exist
    together = engine.generate(prompts, params)
    assert [(c.output_ids, c.finish_reason, c.text) for c in together] == [
        (c.output_ids, c.finish_reason, c.text) for c in alone]


def test_dtypes_generate(tiny_dir: Path) -> None:
    """bf16 and int8 run and stay close to fp32 (on a random tiny model margins are small: the real bound for
    int8, >= 97% top-1 agreement, is checked on SmolLM2 in test_real_model.py)."""
    import ponder

    ref = ponder.load(str(tiny_dir))
    ids = torch.randint(5, ref.model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = ref.model(ids, ref.model.new_cache(1, 48)).argmax(-1)
        for dtype, min_agree in (("bf16", 0.9), ("int8", 0.6)):
            m = ponder.load(str(tiny_dir), dtype=dtype).model
            got = m(ids, m.new_cache(1, 48)).argmax(-1)
            agree = (got == expected).float().mean().item()
            assert agree >= min_agree, (dtype, agree)
    from ponder.model.q4 import native_kernel
    from ponder.model.quant import Int8BlockLinear, Int8Linear

    # every projection really is int8: blocks of 32 on ponder's GEMM where it runs, else per-channel
    kind = Int8BlockLinear if native_kernel() else Int8Linear
    int8_layers = [mod for mod in m.modules() if isinstance(mod, kind)]
    assert len(int8_layers) == 4 * ref.model.config.num_hidden_layers
    assert all(mod.qweight.dtype == torch.int8 for mod in int8_layers) if kind is Int8Linear else \
        all(mod.packed.dtype == torch.uint8 for mod in int8_layers)


def test_int8_weight_error_is_bounded(tiny_dir: Path) -> None:
    """Round to nearest with per-row scales (or per block of 32): each weight is off by at most half a step."""
    import ponder
    from ponder.model.quant import Int8BlockLinear, Int8Linear, int8_blocks

    ref = ponder.load(str(tiny_dir)).model
    q = ponder.load(str(tiny_dir), dtype="int8").model
    w = ref.layers[0].mlp.wdown.weight
    layer = q.layers[0].mlp.wdown
    if isinstance(layer, Int8BlockLinear):
        step = int8_blocks(w)[1].repeat_interleave(32, 1)
    else:
        assert isinstance(layer, Int8Linear)
        step = layer.scale.float()[:, None]
    assert ((layer.dequantized() - w).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(3, w.shape[1])
    exact = x @ w.T
    assert (layer(x) - exact).abs().max().item() < 0.05 * exact.abs().max().item()


@pytest.mark.parametrize("with_holes", [False, True])
def test_masked_many_query_attention_folds_query_groups_exactly(with_holes: bool) -> None:
    """A verify/tree step's attention (several queries, a mask, grouped KV heads) folds each KV head's query group
    into the query axis; it must equal attention with every KV head repeated for its query heads."""
    from ponder.model.llama import StepContext, _attend

    torch.manual_seed(0)
    B, T, H, Hkv, D, S = 2, 3, 6, 2, 8, 7
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    keys, values = torch.randn(B, Hkv, S, D, dtype=torch.float64), torch.randn(B, Hkv, S, D, dtype=torch.float64)
    mask = torch.rand(B, 1, T, S) < 0.7
    mask[..., 0] = True  # every query sees a key
    holes = (torch.rand(B, Hkv, S) < 0.3) if with_holes else None
    if holes is not None:
        holes[..., 0] = False
    ctx = StepContext(None, None, None, None, S, mask, False)
    got = _attend(q, keys, values, ctx, H // Hkv, holes)
    k, v = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)
    m = mask if holes is None else mask & ~holes.repeat_interleave(H // Hkv, 1)[:, :, None, :]
    scores = (q.transpose(1, 2) @ k.transpose(-1, -2)) / D ** 0.5
    want = (scores.masked_fill(~m, float("-inf")).softmax(-1) @ v).transpose(1, 2)
    assert got.shape == (B, T, H, D) and torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("group", [1, 3])
def test_a_later_chunk_attends_to_its_prefix_and_itself_apart_exactly(group: int) -> None:
    """A prompt's later chunk: attention over the common prefix (one unmasked call) and among the new tokens (one
    causal call), merged by log-sum-exp, equals causal attention over all the keys."""
    from ponder.model.llama import _attend_after_prefix

    torch.manual_seed(0)
    B, T, Hkv, D, prefix = 2, 7, 2, 8, 40
    H = Hkv * group
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    keys = torch.randn(B, Hkv, prefix + T, D, dtype=torch.float64)
    values = torch.randn(B, Hkv, prefix + T, D, dtype=torch.float64)
    got = _attend_after_prefix(q, keys, values, prefix, group)
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    mask = torch.ones(T, prefix + T, dtype=torch.bool).tril(prefix)
    scores = (q.transpose(1, 2) @ k.transpose(-1, -2)) / D ** 0.5
    want = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)
    assert got.shape == (B, T, H, D) and torch.allclose(got, want, atol=1e-10)


def test_a_chunk_after_a_long_prefix_gives_the_whole_prompts_logits(tmp_path: Path, monkeypatch) -> None:
    """Through the model: a 700-token prompt prefilled as 600 + 100 tokens (the second chunk attends apart to its
    600-token prefix, past ``SPLIT_PREFIX`` and ``SPLIT_TOKENS``) gives the logits of the whole prompt and of one
    masked call."""
    import ponder.model.llama as llama

    model = load_model(make_model_dir(tmp_path, "llama", max_position_embeddings=1024))
    ids = torch.randint(0, model.config.vocab_size, (1, 700), generator=torch.Generator().manual_seed(1))
    assert llama.SPLIT_PREFIX <= 600 and llama.SPLIT_TOKENS <= 100

    def chunked() -> torch.Tensor:
        cache = model.new_cache(1, 700)
        model(ids[:, :600], cache)
        return model(ids[:, 600:], cache)[0]

    calls = []
    split_attention = llama._attend_after_prefix
    monkeypatch.setattr(llama, "_attend_after_prefix", lambda *a: calls.append(1) or split_attention(*a))
    with torch.inference_mode():
        whole = model(ids, model.new_cache(1, 700))[0, 600:]
        split = chunked()
        assert len(calls) == model.config.num_hidden_layers  # the second chunk's layers, split
        monkeypatch.setattr(llama, "SPLIT_PREFIX", 10**9)  # the masked call, for reference
        masked = chunked()
    assert len(calls) == model.config.num_hidden_layers
    assert torch.allclose(split, whole, atol=1e-4) and torch.allclose(split, masked, atol=1e-4)
