"""Custom ops backed by raw Triton kernels.

Each op is a `torch.library.custom_op` with a fake (meta) implementation, so torch.compile traces it as one
opaque node with no graph break and any row count. The op's default implementation is the plain-PyTorch
reference from `ditserve.ops.functional` (so the op itself works, and opchecks, on any device); on CUDA with
Triton importable, the Triton kernel is registered for the CUDA dispatch key.
"""
