"""The ascend backend: the Program lowered through torchair (GE graph or captured graph) with graphopt ops
mapped to torch_npu kernels or their decompositions (plan.py says which, for every node). Written
against the public torch_npu / torchair API; NOT run on an NPU (none is available to the project).
The lowering plan and the decomposition rewrite run on any machine (CI).
"""

from .backend import AscendBackend, AscendExecutable, missing_dependencies
from .lowering import for_ascend
from .plan import ASCEND_OPS, UnmappedOpError, check_plan, lowering_plan, summary

__all__ = ["ASCEND_OPS", "AscendBackend", "AscendExecutable", "UnmappedOpError", "check_plan", "for_ascend",
           "lowering_plan", "missing_dependencies", "summary"]
