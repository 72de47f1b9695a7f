"""DeepSeek-V3-family reference model, its config, checkpoint I/O and tokenizer."""

from .checkpoint import load, save
from .config import ConfigError, DeepseekV3Config
from .deepseek import DeepseekV3ForCausalLM
from .hf_interop import from_transformers

__all__ = [
    "ConfigError",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "from_transformers",
    "load",
    "load_tokenizer",
    "save",
]


def load_tokenizer(path=None):
    """The tokenizer at `path` (a tokenizer.json), or the packaged one; see graphopt.models.tokenizer."""
    from .tokenizer import load_tokenizer as f  # imported on use: `tokenizers` is not needed for the model

    return f(path)
