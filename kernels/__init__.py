"""`vlm.kernels`: masked attention behind one function, ``attention(q, k, v, spec)``."""

from vlm.kernels.dispatch import attention
from vlm.kernels.reference import reference_attention
from vlm.kernels.spec import AttnOutput, AttnSpec, group_allow_matrix

__all__ = ["attention", "reference_attention", "AttnOutput", "AttnSpec", "group_allow_matrix"]
