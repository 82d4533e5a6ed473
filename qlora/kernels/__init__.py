"""Tensor-level NF4 ops: Triton kernels beside their torch references.

Everything here takes and returns plain tensors (the bitsandbytes byte layout); nothing
here knows about NF4Weight, layers or models.
"""
