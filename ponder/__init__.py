"""ponder: a token-adaptive inference engine for decoder-only LLMs."""

from ponder.engine import Completion, Engine, StreamEvent
from ponder.errors import PonderError
from ponder.model.loader import DEFAULT_MODEL, Loaded, load
from ponder.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL", "Completion", "Engine", "Loaded", "PonderError", "SamplingParams", "StreamEvent", "load",
    "__version__",
]
