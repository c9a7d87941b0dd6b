"""nvcc for the CPU tests: where it is, and a build of a kernel file held to its register budget.

A kernel's launch bounds cap its registers; ptxas then spills what does not fit to local memory, silently
slower. The launchers' compile options (-D sets) are each built here for the archs we run on, and a
warning or a spill fails the test that asked.
"""
import os
import re
import shutil
import subprocess

import pytest

from kernels._cuda import write_source

NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


def build_without_spills(filename, arch, tmp_path, defines=()):
    """Build kernels/<filename> (as NVRTC gets it: kernels/*.cuh pasted in) for `arch` with -D `defines`;
    assert it builds, with no warning and no spill in any entry point. Returns ptxas's report (stderr)."""
    cmd = [NVCC, "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v"] + [f"-D{d}" for d in defines]
    cmd += ["-o", str(tmp_path / "k.cubin"), write_source(filename, tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr.lower() and "performance loss" not in res.stderr.lower(), res.stderr
    spills = [(s, l) for s, l in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
              if s != "0" or l != "0"]
    assert not spills, f"{filename} {arch} {' '.join(defines)}: spills\n{res.stderr}"
    return res.stderr
