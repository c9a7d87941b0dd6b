"""GPU kernels (CuPy RawKernels) for the indexers and sparse MLA, each beside its numpy reference.

One kernel family per `.cu` file; its launcher and numpy reference live in the sibling `.py`.
Device helpers several families share (cp.async, wgmma, mbarriers) live in `hopper.cuh`, which a `.cu`
includes (`_cuda.source` pastes it in for NVRTC, which resolves no includes).
The reference is both the CPU path and the test oracle: callers use the dispatching function,
which picks the kernel for CuPy arrays and the reference for numpy arrays.
"""
