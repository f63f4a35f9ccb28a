"""Model code and weight loading."""

from ponder.model.config import ModelConfig
from ponder.model.llama import LlamaModel
from ponder.model.loader import DEFAULT_MODEL, Loaded, load

__all__ = ["DEFAULT_MODEL", "LlamaModel", "Loaded", "ModelConfig", "load"]
