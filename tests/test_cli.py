"""The ``ponder`` command: each user mistake gives one line on stderr and exit code 1, never a traceback."""

import json
import shutil
from pathlib import Path

import pytest

from ponder.cli import main


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ponder: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_generate_streams_text_and_reports_speed(capsys, tiny_dir: Path) -> None:
    code, out, err = run_cli(capsys, "generate", "the sea is", "--model", str(tiny_dir), "--raw",
                             "--max-new-tokens", "6", "--ignore-eos")
    assert code == 0
    assert out.strip()
    assert "6 tokens" in err and "tokens/s" in err


@pytest.mark.serial  # compiles
def test_generate_on_the_fast_path(capsys, tiny_dir: Path) -> None:
    """--compile with q4 and speculation: the compiled layer's plain and speculative outputs are the same text."""
    args = ("generate", "a b c a b c a", "--model", str(tiny_dir), "--raw", "--max-new-tokens", "8", "--ignore-eos",
            "--dtype", "q4", "--compile")
    code, plain, err = run_cli(capsys, *args)
    assert code == 0 and "8 tokens" in err
    code, spec, _ = run_cli(capsys, *args, "--speculate", "pld")
    assert code == 0 and spec == plain


def test_generate_batch_size_gives_the_same_text(capsys, tiny_dir: Path) -> None:
    args = ("generate", "a b c", "one two", "x", "--model", str(tiny_dir), "--raw", "--max-new-tokens", "6")
    _, whole, _ = run_cli(capsys, *args)
    code, two, _ = run_cli(capsys, *args, "--batch-size", "2")
    assert code == 0 and whole.split("\n")[:-2] == two.split("\n")[:-2] and "--- [2]" in two


def test_generate_batch_prints_every_prompt(capsys, tiny_dir: Path) -> None:
    code, out, _ = run_cli(capsys, "generate", "the sea", "a red car", "--model", str(tiny_dir),
                           "--max-new-tokens", "3", "--ignore-eos")
    assert code == 0
    assert "--- [0]" in out and "--- [1]" in out


def test_info_summarizes_the_model(capsys, tiny_dir: Path) -> None:
    code, out, _ = run_cli(capsys, "info", "--model", str(tiny_dir))
    assert code == 0
    facts = {line[:22].strip(): line[23:] for line in out.splitlines()}
    assert facts["layers"] == "3"
    assert facts["architecture"] == "llama"
    assert facts["attention heads"].startswith("4 (KV heads 2")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_info_kv_bytes_match_the_cache_the_engine_allocates(capsys, tiny_dir: Path, dtype: str) -> None:
    """int8 keeps K/V in fp32 (``LlamaModel.kv_dtype``): the figure must come from the real cache, not the weights."""
    import ponder

    model = ponder.load(str(tiny_dir), dtype).model
    per_token = model.new_cache(1, 16).nbytes() / 16
    code, out, _ = run_cli(capsys, "info", "--model", str(tiny_dir), "--dtype", dtype)
    assert code == 0
    facts = {line[:22].strip(): line[23:] for line in out.splitlines()}
    assert facts["KV cache per token"].startswith(f"{per_token / 1024:.1f} KiB"), (facts, per_token)


def test_system_with_raw_is_refused(capsys, tiny_dir: Path) -> None:
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(tiny_dir), "--raw", "--system", "Be brief.")
    assert_one_line_error(code, err, "--system", "--raw")


def _without_chat_template(tiny_dir: Path, tmp_path: Path) -> Path:
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_dir, plain)
    (plain / "chat_template.jinja").unlink()
    return plain


def test_system_without_a_chat_template_is_refused(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    plain = _without_chat_template(tiny_dir, tmp_path)
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(plain), "--system", "Be brief.",
                           "--max-new-tokens", "2")
    assert_one_line_error(code, err, "--system", "chat template")


def test_no_chat_template_still_generates_without_system(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    plain = _without_chat_template(tiny_dir, tmp_path)
    code, out, _ = run_cli(capsys, "generate", "the sea", "--model", str(plain), "--max-new-tokens", "2",
                           "--ignore-eos")
    assert code == 0 and out.strip()


def test_unknown_model(capsys) -> None:
    code, _, err = run_cli(capsys, "info", "--model", "no-such-model")
    assert_one_line_error(code, err, "unknown model")


def test_missing_gguf_file(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "info", "--model", str(tmp_path / "absent.gguf"))
    assert_one_line_error(code, err, "not found")


def test_truncated_weights(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(broken))
    assert_one_line_error(code, err, "truncated or corrupt")


def test_corrupt_gguf(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PONDER_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    code, _, err = run_cli(capsys, "info", "--model", str(bad))
    assert_one_line_error(code, err, "truncated or corrupt")


def test_unsupported_architecture(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (other / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "info", "--model", str(other))
    assert_one_line_error(code, err, "unsupported architecture GPT2LMHeadModel")


def test_prompt_longer_than_context(capsys, tiny_dir: Path) -> None:
    long_prompt = " ".join(["the sea"] * 200)  # 400 tokens > the tiny model's 256
    code, _, err = run_cli(capsys, "generate", long_prompt, "--model", str(tiny_dir), "--raw")
    assert_one_line_error(code, err, "context window")


@pytest.mark.parametrize(
    "flag, value, needle",
    [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"),
     ("--top-k", "-2", "top_k"), ("--max-new-tokens", "0", "max_new_tokens"), ("--seed", "-3", "seed"),
     ("--batch-size", "0", "batch-size")],
)
def test_invalid_sampling_parameters(capsys, tiny_dir: Path, flag: str, value: str, needle: str) -> None:
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(tiny_dir), flag, value)
    assert_one_line_error(code, err, needle)


def test_unreadable_suite_file(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "bench", "--model", str(tiny_dir), "--suite", f"specbench:{tmp_path / 'nope.jsonl'}",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "nope.jsonl")


def test_malformed_suite_line(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"question_id": 1, "category": "qa", "turns": ["the sea"]}\n{"question_id": 2, "turns": 5}\n')
    code, _, err = run_cli(capsys, "bench", "--model", str(tiny_dir), "--suite", f"specbench:{suite}",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "suite.jsonl:2")


def test_unknown_bench_method(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "bench", "--model", str(tiny_dir), "--methods", "baseline,warp-drive",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "warp-drive")


def test_serve_on_a_port_in_use_or_out_of_range_is_one_line_before_the_model_loads(capsys, tiny_dir: Path,
                                                                                   monkeypatch) -> None:
    """``ponder serve`` binds its port before loading the model: a port another program holds and a port over
    65535 are each one line, and the model is never loaded for nothing."""
    pytest.importorskip("uvicorn")
    import socket

    import ponder

    loads = []
    monkeypatch.setattr(ponder, "load", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--model", str(tiny_dir), "--port", str(port))
        assert_one_line_error(code, err, f"cannot listen on 127.0.0.1:{port}", "in use")
    code, _, err = run_cli(capsys, "serve", "--model", str(tiny_dir), "--port", "70000")
    assert_one_line_error(code, err, "--port must be <= 65535")
    assert not loads
    from ponder.errors import PonderError
    from ponder.server.app import bind, listen, port_of

    first = bind("127.0.0.1", 0)  # two servers started together both bind (SO_REUSEADDR, neither listening yet) ...
    second = bind("127.0.0.1", port_of(first))
    try:
        listen(first, "127.0.0.1")
        with pytest.raises(PonderError, match=f"cannot listen on 127.0.0.1:{port_of(first)}"):
            listen(second, "127.0.0.1")  # ... but only one may listen: the other says so before its start-up line
    finally:
        for sock in first + second:
            sock.close()
