"""Triton kernels of the sparse-attention pipeline, one concern per file. Kernels know nothing of FX or Dynamo."""
