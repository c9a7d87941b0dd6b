"""Which GPU holds which layers: a plan made from byte counts alone, before anything is allocated.

The model is a chain of stages (the embeddings, each layer, the final norm with lm_head) and the hidden
state passes through them in order, so each GPU takes a run of consecutive stages and the hidden state
is copied to the next GPU at a run's end (pipeline placement, one process). The plan makes the fullest
GPU as empty as possible, in proportion to each GPU's usable memory: its free memory less a headroom
for the caches, the activations and the kernels' work space.
"""
import os

from weights.safetensors import CheckpointError

HEADROOM = 0.10       # of each GPU's free memory kept out of the plan ...
HEADROOM_MIN = 2e9    # ... but at least this many bytes
GB = 1e9


class PlacementError(CheckpointError):
    """The weights do not fit the memory there is; the one-line message gives the numbers."""


def usable(free):
    """Bytes of a GPU's (or the host's) free memory that weights may take."""
    return max(0.0, free - max(HEADROOM_MIN, HEADROOM * free))


def plan(sizes, capacities):
    """Cut the stages (their byte counts `sizes`, in order) into consecutive runs, one per device, so that
    the fullest device, bytes / capacity, is as empty as it can be. Returns the device of each stage,
    or None if even filling every device to its capacity cannot hold them all.

    Greedy filling up to a fraction r of each capacity (a device takes stages while they fit, then the
    next device starts) succeeds exactly when some cut fits under r, so a bisection on r finds the best."""
    def fill(r):
        device, used, where = 0, 0.0, []
        for size in sizes:
            while used + size > r * capacities[device]:
                device, used = device + 1, 0.0
                if device == len(capacities):
                    return None
            where.append(device)
            used += size
        return where

    if not capacities or fill(1.0) is None:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
    return fill(hi)


def place(sizes, free, what):
    """plan() on the GPUs' free memory (bytes, one entry per GPU); raises PlacementError with the numbers
    when the stages do not fit. `what` names the weights in the message, e.g. "the fp8 weights"."""
    caps = [usable(f) for f in free]
    where = plan(sizes, caps)
    if where is not None:
        return where
    need = sum(sizes)
    keep = "keeping 10% (at least 2 GB) of each for caches and work space"
    if len(free) == 1:
        raise PlacementError(f"{what} need {need / GB:.1f} GB; GPU 0 has {free[0] / GB:.1f} GB free, "
                             f"{caps[0] / GB:.1f} GB usable ({keep})")
    per_gpu = " + ".join(f"{c / GB:.1f}" for c in caps)
    if need > sum(caps):
        raise PlacementError(f"{what} need {need / GB:.1f} GB; the {len(free)} GPUs have {per_gpu} = "
                             f"{sum(caps) / GB:.1f} GB usable ({keep})")
    raise PlacementError(f"{what} need {need / GB:.1f} GB, and the {len(free)} GPUs have {per_gpu} GB usable "
                         f"({keep}), but no cut into consecutive layers fits: the largest layer takes "
                         f"{max(sizes) / GB:.1f} GB")


def describe(where, sizes, free, names):
    """The plan as a table: each GPU's stages (names[i] is stage i's), weight GB and free GB."""
    lines = [f"  {'GPU':>3}  {'stages':<34} {'weights GB':>10} {'free GB':>8}"]
    for device in range(len(free)):
        mine = [i for i, d in enumerate(where) if d == device]
        if mine:
            first, last = names[mine[0]], names[mine[-1]]
            span = first if first == last else f"{first} .. {last}"
            total = sum(sizes[i] for i in mine)
        else:
            span, total = "(none)", 0
        lines.append(f"  {device:>3}  {span:<34} {total / GB:>10.1f} {free[device] / GB:>8.1f}")
    return "\n".join(lines)


def gpu_free_memory(n=None):
    """Free bytes on each of the first n visible GPUs (default all)."""
    import cupy as cp
    count = cp.cuda.runtime.getDeviceCount()
    free = []
    for device in range(count if n is None else min(n, count)):
        with cp.cuda.Device(device):
            free.append(float(cp.cuda.runtime.memGetInfo()[0]))
    return free


def host_available_memory():
    """Bytes of host memory available to a new allocation without swapping (Linux MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
