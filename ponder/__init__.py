"""ponder: a token-adaptive inference engine for decoder-only LLMs."""

from ponder.errors import PonderError
from ponder.model.loader import DEFAULT_MODEL, Loaded, load

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "Loaded", "PonderError", "load", "__version__"]
