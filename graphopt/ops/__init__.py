"""graphopt:: custom ops: reference and fake (meta) implementations, in one namespace.

Importing this package registers every op. Backends only add faster implementations of these same ops
(`torch.library.impl` for their device), never new semantics.
"""

from . import core  # noqa: F401  rms_norm, swiglu, linear, moe_route, moe_experts
from . import attention  # noqa: F401  mla_attention (expanded / absorbed)
from . import cache  # noqa: F401  kv_cache_write (in place)
from . import kv_int8  # noqa: F401  kv_int8_entry (C8: the int8 latent cache entry)
from . import paged_attention  # noqa: F401  mla_paged_attention (over the paged cache), its int8-cache twin
from . import quant  # noqa: F401  quantize / dequantize / quantized linear
from . import sampling  # noqa: F401  sampling and speculative acceptance
