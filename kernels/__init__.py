"""GPU kernels (CuPy RawKernels) for the indexers and sparse MLA, each beside its numpy reference.

One kernel family per `.cu` file; its launcher and numpy reference live in the sibling `.py`.
The reference is both the CPU path and the test oracle: callers use the dispatching function,
which picks the kernel for CuPy arrays and the reference for numpy arrays.
"""
