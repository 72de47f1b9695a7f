"""graphopt: a compiler-style graph pipeline that makes DeepSeek-V3-family models fast to serve.

Public API: `compile`, `CompiledModel` (`.save(dir)`), `load_compiled(dir)` and the config
dataclasses `SpecConfig`, `QuantConfig`.
Everything else is reachable through the subpackages (`graphopt.models`, `graphopt.passes`, ...).
"""

from .api import CompiledModel, compile, load_compiled

__version__ = "0.1.0"

__all__ = ["compile", "CompiledModel", "load_compiled", "SpecConfig", "QuantConfig", "__version__"]


def __getattr__(name):  # the config dataclasses live with their subsystems; import on first use
    if name == "SpecConfig":
        from .spec import SpecConfig
        return SpecConfig
    if name == "QuantConfig":
        from .quant.config import QuantConfig
        return QuantConfig
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
