"""Sliding-window models (Mistral type) refuse KV-cache policies before anything is generated: their window mask
compares cache slots, which stop being positions once a policy evicts or selects entries."""

from pathlib import Path

import pytest

import ponder
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.kv import make_policy
from test_cli import assert_one_line_error, run_cli
from tinymodel import make_model_dir


@pytest.fixture(scope="module")
def window_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("mistral-window"), "mistral", sliding_window=8)


def test_engine_refuses_kv_policies_on_sliding_window_models(window_dir: Path) -> None:
    loaded = ponder.load(str(window_dir))
    for spec in ("snapkv:ratio=0.5", "streaming:ratio=0.5", "quant"):
        with pytest.raises(PonderError, match="sliding-window"):
            Engine(loaded, kv=make_policy(spec))
    assert Engine(loaded).generate([[5, 6, 7]], ponder.SamplingParams(max_new_tokens=3))[0].output_ids


def test_cli_refuses_before_streaming(capsys, window_dir: Path) -> None:
    code, out, err = run_cli(capsys, "generate", "the sea is " * 6, "--model", str(window_dir), "--raw",
                             "--kv", "snapkv:ratio=0.5", "--max-new-tokens", "4")
    assert out == ""  # nothing streamed
    assert_one_line_error(code, err, "sliding-window", "--kv")
