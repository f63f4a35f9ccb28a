"""--dtype q4: GGUF Q4_0/Q4_1 blocks mapped onto PyTorch's int4 kernel, ponder's own 4-bit rounding, the int8 head
with exact re-scoring, and the errors for files q4 cannot read."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ponder.errors import PonderError
from ponder.model import gguf_convert
from ponder.model.config import ModelConfig
from ponder.model.llama import LlamaModel
from ponder.model.q4 import GROUP, RescoredHead, Q4Linear, gguf_blocks, quantize_blocks, quantize_q4

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB = 4, 2, 16, 64, 96, 40
PROJ = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}


def write_q4_gguf(path: Path, kinds: dict[str, str]) -> None:
    """A one-layer llama GGUF whose projections are quantized to ``kinds[name]`` (default Q4_1) by gguf itself."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_embedding_length, HIDDEN), (w.add_feed_forward_length, FFN),
                       (w.add_head_count, HEADS), (w.add_head_count_kv, KV_HEADS), (w.add_context_length, 64),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0), (w.add_vocab_size, VOCAB)):
        add(value)
    w.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32))
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(HIDDEN, dtype=np.float32))
    for name, shape in PROJ.items():
        kind = GGMLQuantizationType[kinds.get(name, "Q4_1")]
        data = (rng.standard_normal(shape) * 0.1 + rng.standard_normal((shape[0], 1)) * 0.02).astype(np.float32)
        w.add_tensor(f"blk.0.{name}.weight", quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fp32_model_of(path: Path) -> LlamaModel:
    """The fp32 model ponder's GGUF conversion gives (dequantized with gguf, Q/K rows put back in HF order)."""
    from ponder.model.loader import _our_state_dict

    reader = gguf_convert._open(path)
    config = gguf_convert._hf_config(gguf_convert._metadata(reader), "llama", {t.name for t in reader.tensors})
    cfg = ModelConfig.from_hf(config)
    model = LlamaModel(cfg)
    model.load_state_dict(_our_state_dict(dict(gguf_convert._hf_tensors(reader, config, path)), cfg), strict=False)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_blocks_equal_ggufs_own_dequantization(tmp_path: Path, kind: str) -> None:
    from gguf.quants import dequantize

    path = tmp_path / "q.gguf"
    write_q4_gguf(path, {"ffn_down": kind})
    t = next(t for t in gguf_convert._open(path).tensors if t.name == "blk.0.ffn_down.weight")
    codes, d, m = gguf_blocks(t)
    assert codes.shape == PROJ["ffn_down"] and int(codes.max()) <= 15 and d.shape == m.shape
    mine = codes.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)
    ref = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(mine.shape))
    assert torch.equal(mine, ref)


def test_q4_model_multiplies_by_the_gguf_weights(tmp_path: Path) -> None:
    """Every fused projection (Q/K rows un-permuted, Q4_0 and Q4_1 mixed) against the fp32 conversion, within the
    bf16 rounding of scale and zero; a wrong row order or nibble order would be off by the weights' own size."""
    path = tmp_path / "q.gguf"
    write_q4_gguf(path, {"attn_k": "Q4_0", "ffn_up": "Q4_0"})
    ref = fp32_model_of(path)
    q4 = quantize_q4(fp32_model_of(path), path)
    for name in ("wqkv", "wo", "wgate_up", "wdown"):
        owner = "attn" if name in ("wqkv", "wo") else "mlp"
        want = getattr(getattr(ref.layers[0], owner), name).weight
        layer = getattr(getattr(q4.layers[0], owner), name)
        assert isinstance(layer, Q4Linear)
        err = (layer.dequantized() - want).abs().max().item()
        assert err <= 2**-7 * want.abs().max().item(), (name, err)
        x = torch.randn(5, want.shape[1])
        assert torch.allclose(layer(x), x @ want.T, atol=0.02 * (x @ want.T).abs().max().item()), name
    assert isinstance(q4.lm_head, RescoredHead) and q4.invariant_attention


def test_q4_refuses_other_gguf_block_types(tmp_path: Path) -> None:
    path = tmp_path / "q8.gguf"
    write_q4_gguf(path, {"ffn_gate": "Q8_0"})
    with pytest.raises(PonderError, match="blk.0.ffn_gate.weight in q8.gguf is Q8_0; use --dtype int8 or fp32"):
        quantize_q4(fp32_model_of(path), path)


def test_ponders_own_rounding_is_within_half_a_step() -> None:
    w = torch.randn(48, 96) * torch.rand(48, 1)
    codes, d, m = quantize_blocks(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    back = codes.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)
    assert ((back - w).abs() <= d.repeat_interleave(GROUP, 1) / 2 + 1e-6).all()
    with pytest.raises(PonderError, match="multiple of 32"):
        quantize_blocks(torch.randn(4, 40))


@pytest.mark.parametrize("rows,width", [(512, 64), (500, 64), (512, 48)])  # int4 copy; int8 (no int4 tiling)
def test_head_rescores_its_top_logits_exactly(rows: int, width: int) -> None:
    """The re-scored logits are the fp32 head's own, bit for bit, so the greedy token is the fp32 head's; the rest
    are within the approximate copy's rounding."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, width, generator=g)
    head = RescoredHead(w)
    int4 = head.approx is not None
    assert int4 == (rows % 16 == 0 and width % 32 == 0)
    x = torch.randn(7, width, generator=g)
    got, ref = head(x), x @ w.T
    top = head.approximate(x).topk(16, dim=-1).indices  # the re-scored logits
    rows = torch.arange(7)[:, None]
    assert torch.allclose(got[rows, top], (w[top] * x[:, None, :]).sum(-1), rtol=0, atol=0)
    assert torch.allclose(got[rows, top], ref[rows, top], atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert (got - ref).abs().max() < (0.25 if int4 else 0.05) * ref.abs().max()


def test_a_head_no_kernel_can_take_is_refused() -> None:
    """The int8 kernel reads 16-wide tiles and crashes the process on other widths: a clear error instead."""
    with pytest.raises(PonderError, match="multiple of 16"):
        RescoredHead(torch.randn(512, 40))


def test_q4_loads_and_generates_from_a_model_directory(tiny_dir: Path) -> None:
    """A Hugging Face directory has no 4-bit blocks: ponder rounds its weights itself. The random tiny model's top-2
    margins are tiny, so 4 bits flip many tokens (55% agreement here; a broken mapping gives ~1%, one in the
    vocabulary); the real bound, >= 98% top-1 agreement, is checked on SmolLM2."""
    import ponder

    ref = ponder.load(str(tiny_dir))
    q4 = ponder.load(str(tiny_dir), dtype="q4")
    assert sum(isinstance(m, Q4Linear) for m in q4.model.modules()) == 4 * ref.model.config.num_hidden_layers
    ids = torch.randint(5, ref.model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = ref.model(ids, ref.model.new_cache(1, 48)).argmax(-1)
        got = q4.model(ids, q4.model.new_cache(1, 48)).argmax(-1)
    assert (got == want).float().mean().item() >= 0.3
    out = ponder.Engine(q4).generate(["the sea is"], ponder.SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(out[0].output_ids) == 5


def test_kernel_ready_tensors_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second q4 load reads the cache instead of the GGUF and gets the same tensors."""
    from ponder.model import q4 as q4_mod

    path, cache = tmp_path / "q.gguf", tmp_path / "q4.safetensors"
    write_q4_gguf(path, {})
    first = quantize_q4(fp32_model_of(path), path, cache)
    assert cache.is_file()
    monkeypatch.setattr(q4_mod, "_gguf_projection_blocks", lambda *a: pytest.fail("read the GGUF again"))
    second = quantize_q4(fp32_model_of(path), path, cache)
    for a, b in zip(first.layers[0].modules(), second.layers[0].modules()):
        if isinstance(a, Q4Linear):
            assert a.native == b.native and torch.equal(a.packed, b.packed)
            assert (a.scale_zero is None) == (b.scale_zero is None) == a.native
            assert a.native or torch.equal(a.scale_zero, b.scale_zero)
    x = torch.randn(2, 3, HIDDEN)
    assert torch.equal(first.layers[0].mlp(x), second.layers[0].mlp(x))


def test_roofline_counts_the_bytes_each_format_reads(tiny_dir: Path) -> None:
    """The bench's weight bytes per forward: q4 < int8 < fp32, the q4 head counted as the copy its kernel reads."""
    import ponder
    from ponder.bench.roofline import weight_bytes

    sizes = {d: weight_bytes(ponder.load(str(tiny_dir), dtype=d).model) for d in ("fp32", "int8", "q4")}
    assert sizes["q4"] < sizes["int8"] < sizes["fp32"]
    q4 = ponder.load(str(tiny_dir), dtype="q4").model
    head = q4.lm_head
    read = sum(t.numel() * t.element_size() for t in head.approx.buffers()) if head.approx is not None else \
        head.qweight.numel() + 2 * head.qscale.numel()
    layers = sum(t.numel() * t.element_size() for part in (*q4.layers, q4.norm)
                 for t in (*part.parameters(), *part.buffers()))
    assert sizes["q4"] == layers + read
