"""DeepSeek-V3-family reference model, its config, checkpoint I/O and tokenizer."""

import warnings

# torch 2.13 marks pytree's LeafSpec class deprecated with typing_extensions.deprecated, which warns
# on every *construction*, and copy.deepcopy reconstructs the LeafSpecs torch.export itself stores in
# graph meta (copyreg.__newobj__) whenever a pass deep-copies a captured graph (fuse_spec_step,
# patterns.trace_pattern): six FutureWarnings per compile that no graphopt code can act on. Ignored
# only for that message, that category and that call site (module copyreg), so a LeafSpec built by
# user code still warns. Installed here because every path to capture (graphopt.compile, load,
# the CLI) imports graphopt.models first.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        category=FutureWarning, module="copyreg")

# tqdm's monitor thread (started by the first visible bar, whichever module draws it) made the demo's
# first generate after a compile on a terminal 60-100x slower on a 2-core CPU (53-76 s instead of
# 0.7-0.9 s for 144 tokens); no graphopt bar needs it (it only re-tunes miniters), so none is started,
# process-wide. Here for the same reason as the filter above: compile, load_compiled, models.load and
# the CLI's verbs all import graphopt.models before any bar; `graphopt --help` imports neither.
from tqdm import tqdm as _tqdm

_tqdm.monitor_interval = 0

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
