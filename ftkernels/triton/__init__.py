"""Triton kernels, one module per feature (imported lazily by the ops that use them)."""
