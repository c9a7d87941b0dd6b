"""Every kernel source compiles for sm_90 with nvcc, so a kernel that does not build cannot land (CPU test).

The sources are compiled at run time by NVRTC on the GPU machine, which resolves no includes: the only
include a kernel may have is `#include "NAME.cuh"` of a kernels/*.cuh, which kernels/_cuda.py:source() pastes
in, so NVRTC gets one self-contained text. nvcc here builds that same text, and each file as it stands too.
"""
import glob
import os
import re
import subprocess

import pytest

from kernel_build import NVCC
from kernels._cuda import KERNEL_DIR, PRELUDE, source as kernel_source, write_source

KERNELS = sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cu")))
PRELUDES = sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cuh")))


def test_there_are_kernels():
    assert len(KERNELS) >= 5, KERNELS


@pytest.mark.parametrize("source", KERNELS + PRELUDES, ids=os.path.basename)
def test_no_includes(source):
    """No include but a kernels/*.cuh (PRELUDE lines), and none at all in the text NVRTC compiles."""
    with open(source) as f:
        includes = [l.strip() for l in f if re.match(r"\s*#\s*include", l) and not PRELUDE.match(l.strip())]
    assert not includes, f"{os.path.basename(source)}: NVRTC on the GPU machine cannot resolve {includes}"
    if source in KERNELS:
        text = kernel_source(os.path.basename(source))
        assert not re.search(r"^\s*#\s*include", text, re.M), f"{os.path.basename(source)}: an include left for NVRTC"


def prelude_names(path):
    with open(path) as f:
        return PRELUDE.findall(f.read())


@pytest.mark.parametrize("source", KERNELS, ids=os.path.basename)
def test_preludes_are_pasted_in(source):
    """Each `#include "NAME.cuh"` names a kernels/*.cuh, and the compiled text has that file in its place."""
    names = prelude_names(source)
    for name in names:
        assert os.path.join(KERNEL_DIR, name) in PRELUDES, f"{os.path.basename(source)}: no kernels/{name} (*.cuh)"
    text = kernel_source(os.path.basename(source))
    assert not PRELUDE.search(text), "a prelude line was left in the compiled text"
    assert [l for l in text.splitlines() if l.startswith('#line 1 "')] == [f'#line 1 "{n}"' for n in names]


def test_every_prelude_has_a_user():
    used = {name for k in KERNELS for name in prelude_names(k)}
    unused = {os.path.basename(p) for p in PRELUDES} - used
    assert not unused, f"no kernel asks for {sorted(unused)}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")
@pytest.mark.parametrize("source", KERNELS, ids=os.path.basename)
def test_file_as_it_stands_compiles_for_sm90(source, tmp_path):
    """nvcc on kernels/<file> itself (its includes resolved beside it), as an editor or a reader would build it."""
    r = subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-std=c++17", "-o", str(tmp_path / "k.cubin"), source],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{os.path.basename(source)} does not compile as it stands:\n{r.stderr[-4000:]}"


def compile_report(source, tmp_path, arch, defines=()):
    """ptxas -v output of one nvcc -cubin build of kernels/<source> with its preludes (asserting it builds)."""
    if NVCC is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found: CI must compile-check every kernel")
        pytest.skip("nvcc not found on this machine")
    built = write_source(os.path.basename(source), tmp_path)
    r = subprocess.run([NVCC, "-cubin", *arch, "-std=c++17", "-Xptxas", "-v", *(f"-D{d}" for d in defines),
                        "-o", str(tmp_path / "k.cubin"), built], capture_output=True, text=True)
    assert r.returncode == 0, f"{os.path.basename(source)} {defines} does not compile:\n{r.stderr[-4000:]}"
    return r.stderr


def spills(report):
    """Entry functions whose registers spill to local memory (a stack frame, spill stores or loads)."""
    bad, name = [], None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line) or re.search(r"Function properties for (\w+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and any(int(x) for x in m.groups()):
            bad.append(f"{name}: {line.strip()}")
    return bad


SM90 = ["-arch=sm_90"]
SM90A = ["-gencode=arch=compute_90a,code=sm_90a"]  # the arch-specific target (wgmma); -arch=sm_90a also runs a plain pass


@pytest.mark.parametrize("source", KERNELS, ids=os.path.basename)
def test_compiles_for_sm90(source, tmp_path):
    report = compile_report(source, tmp_path, SM90)
    assert not spills(report), spills(report)


# The sparse MLA kernels at the sizes the launcher builds: released (Dc 512, R 64) and small (Dc 128, R 16),
# the tensor-core kernel at each head count per CTA; its O accumulator alone takes Dc/4 registers a thread.
@pytest.mark.parametrize("arch", [SM90, SM90A], ids=["sm_90", "sm_90a"])
@pytest.mark.parametrize("defines", [("SM_DC=512", "SM_R=64", "SM_TC_HG=64"), ("SM_DC=512", "SM_R=64", "SM_TC_HG=16"),
                                     ("SM_DC=128", "SM_R=16", "SM_TC_HG=16"), ("SM_DC=128", "SM_R=64", "SM_TC_HG=48")],
                         ids=lambda d: "-".join(x.split("=")[1] for x in d))
def test_sparse_mla_builds_without_spills(arch, defines, tmp_path):
    source = os.path.join(os.path.dirname(KERNELS[0]), "sparse_mla.cu")
    report = compile_report(source, tmp_path, arch, defines)
    assert "sparse_mla_attend_tc" in report and not spills(report), spills(report) or report[-2000:]
