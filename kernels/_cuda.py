"""Plumbing shared by the launchers: is there a GPU, compile a .cu once, check arguments.

Kernel sources include no system headers (NVRTC on the GPU machine lacks CUDA's crt/ headers). The device
helpers several of them share live in kernels/hopper.cuh: a .cu includes it (so nvcc builds the file as it
stands), and source() pastes it in place of that line, so NVRTC at run time gets one self-contained text,
the same text the CPU compile tests build.
"""
import contextlib
import functools
import os
import re
import warnings

import numpy as np

try:
    import cupy as cp
    HAVE_GPU = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # no cupy, no driver, or no device: the numpy path serves
    cp = None
    HAVE_GPU = False

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))


def xp_of(a):
    """numpy or cupy, whichever module owns array `a`."""
    if cp is not None and isinstance(a, cp.ndarray):
        return cp
    return np


def is_gpu(a):
    return cp is not None and isinstance(a, cp.ndarray)


# --- Several GPUs ------------------------------------------------------------------------------------
# A loaded CUDA module, its functions (with the shared memory they were opted into) and constant tables
# belong to the device that was current when they were made; with several GPUs each needs its own.

def per_device(fn):
    """functools.lru_cache keyed also by the current GPU (positional arguments only)."""
    cached = functools.lru_cache(maxsize=None)(lambda device, *args: fn(*args))

    @functools.wraps(fn)
    def wrapper(*args):
        return cached(cp.cuda.Device().id if cp is not None else None, *args)
    return wrapper


@per_device
def device_attr(name):
    """An attribute of the current GPU under CuPy's name for it ("MultiProcessorCount",
    "MaxSharedMemoryPerBlockOptin", ...), read once per device."""
    return cp.cuda.Device().attributes[name]


def sm_count():
    return device_attr("MultiProcessorCount")


@per_device
def compute_capability():
    """The current GPU's compute capability as an int (90 for an H100 or H200)."""
    return int(cp.cuda.Device().compute_capability)


def device_of(a):
    """The id of the GPU holding array a, or None for a numpy array."""
    return a.device.id if is_gpu(a) else None


def on_device(device):
    """Context in which new arrays and kernel launches go to GPU `device` (nothing to do for None, the CPU)."""
    return contextlib.nullcontext() if device is None else cp.cuda.Device(device)


def to_device(a, device):
    """Array a on GPU `device` (a itself if it is there already, or if device is None)."""
    if device is None or a.device.id == device:
        return a
    # the copy is queued on the destination's stream, which does not wait for the source GPU's queue:
    # finish what produces a there first, and the copy before a can be freed and its memory reused
    a.device.synchronize()
    with cp.cuda.Device(device):
        b = a.copy()  # CuPy: a copy on the current device, wherever a lives
        cp.cuda.get_current_stream().synchronize()
    return b


_zeroed = {}  # (name, device, stream) -> int32 counters, zero between launches


def zeroed_counters(name, n):
    """At least n int32 counters, zero, for the kernels that meet or take tickets through global atomics and
    reset the counters they used before they finish: one array per name, GPU and stream, made zero once. Launches
    on one stream run in order, so each finds its counters zero; launches on two streams may overlap, and get
    two arrays. A larger n replaces the array (the stream's later launches use the new one)."""
    key = (name, cp.cuda.Device().id, cp.cuda.get_current_stream().ptr)
    c = _zeroed.get(key)
    if c is None or c.size < n:
        c = _zeroed[key] = cp.zeros(n, np.int32)
    return c


# --- Compiling and launching -------------------------------------------------------------------------

PRELUDE = re.compile(r'^#include "(\w+\.cuh)"$', re.M)  # a whole line of a .cu: paste kernels/<name> here


def source(filename):
    """The text of kernels/<filename> as compiled: each `#include "NAME.cuh"` line replaced by kernels/NAME.cuh
    (NVRTC on the GPU machine resolves no includes; nvcc compiling the file itself finds it beside it).

    #line directives keep compiler messages pointing at the file and line they come from."""
    with open(os.path.join(KERNEL_DIR, filename)) as f:
        text = f.read()

    def paste(m):
        with open(os.path.join(KERNEL_DIR, m.group(1))) as f:
            prelude = f.read()
        after = text.count("\n", 0, m.start()) + 2  # line number, in filename, of the line after the marker
        return f'#line 1 "{m.group(1)}"\n{prelude.rstrip()}\n#line {after} "{filename}"'
    return PRELUDE.sub(paste, text)


def write_source(filename, directory):
    """source(filename) saved as directory/filename, for nvcc in the CPU compile tests; returns its path."""
    path = os.path.join(directory, filename)
    with open(path, "w") as f:
        f.write(source(filename))
    return path


@per_device
def module(filename, defines=()):
    """Compile kernels/<filename> once per set of -D defines (tuple of 'NAME=VALUE')."""
    options = ("--std=c++17",) + tuple(f"-D{d}" for d in defines)
    return cp.RawModule(code=source(filename), options=options)


@per_device
def module_sm90a(filename, defines=()):
    """(module, has_wgmma): kernels/<filename> built for the arch-specific target sm_90a on Hopper.

    wgmma needs sm_90a, which CuPy's RawModule does not ask NVRTC for, so on an sm_90 device we call
    NVRTC ourselves. Anywhere else, or if that build fails (with a warning saying why), CuPy builds it
    and only the mma.sync kernels are usable: the wgmma entry points trap there.
    """
    if cp.cuda.Device().compute_capability == "90":
        try:
            from cupy.cuda import nvrtc
            options = ["--std=c++17", "-arch=sm_90a"] + [f"-D{d}" for d in defines]
            prog = nvrtc.createProgram(source(filename), filename, [], [])
            try:
                try:
                    nvrtc.compileProgram(prog, options)
                except nvrtc.NVRTCError as e:
                    raise RuntimeError(f"NVRTC failed on {filename}:\n{nvrtc.getProgramLog(prog)}") from e
                cubin = nvrtc.getCUBIN(prog)
            finally:
                nvrtc.destroyProgram(prog)
            mod = cp.cuda.function.Module()
            mod.load(cubin)
            return mod, True
        except Exception as e:  # keep working on the mma.sync kernels, but say why
            warnings.warn(f"{filename}: sm_90a build failed, using the mma.sync kernels ({e})")
    return module(filename, tuple(defines)), False


def with_dynamic_smem(f, smem, carveout=None):
    """Opt kernel f into `smem` bytes of dynamic shared memory (above 48 KB needs the opt-in). carveout: the
    percentage of the SM's L1/shared storage to prefer as shared memory (100: all it can be), for a kernel that
    counts on several CTAs sharing an SM; None leaves the driver's choice."""
    if hasattr(f, "max_dynamic_shared_size_bytes"):  # RawKernel (CuPy-built module)
        f.max_dynamic_shared_size_bytes = smem
        if carveout is not None:
            f.preferred_shared_memory_carveout = carveout
    else:                                            # cupy.cuda.function.Function (our sm_90a build)
        drv = cp.cuda.driver
        drv.funcSetAttribute(f.ptr, getattr(drv, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8), smem)
        if carveout is not None:
            drv.funcSetAttribute(f.ptr, getattr(drv, "CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT", 9),
                                 carveout)
    return f


def kernel(filename, name, defines=()):
    return module(filename, tuple(defines)).get_function(name)


def check(cond, message):
    """Launcher precondition: a clear ValueError instead of a wrong answer or a device fault. message: the text, or
    a function that makes it (`lambda: f"..."`), so that a check on every launch formats nothing until it fails
    (formatting a dtype or a shape costs microseconds)."""
    if not cond:
        raise ValueError(message() if callable(message) else message)


def is_whole(v, least=0):
    """v is an integer (Python or numpy, not a bool) and at least `least`: a count, a size, a seed."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= least


def check_array(a, name, dtype, ndim=None, shape=None):
    """A launcher argument must be a contiguous CuPy array of this dtype (and rank/shape).

    Runs on every launch, so the messages are only formatted once a check has failed."""
    if not is_gpu(a):
        raise ValueError(f"{name}: expected a CuPy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: rank {a.ndim} (shape {a.shape}), expected {ndim}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(a.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name}: shape {a.shape}, dim {i} should be {want}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (shape {a.shape}, strides {a.strides})")


def want(a, name, dtype, shape):
    """check_array for the launchers' hot path: four cheap tests (dtype a np.dtype, shape a tuple of ints), and
    check_array's message only once one has failed."""
    if not (is_gpu(a) and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous):
        check_array(a, name, dtype, ndim=len(shape), shape=shape)
        raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
