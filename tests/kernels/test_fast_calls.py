"""The CPU kernels' Python fast calls (kernels/pyfast.h, kernels/cpu_build.fast_calls): every kernel
library loads them where Python's headers are installed; a fast call and the same C function through
ctypes write the same answer (null pointers included); a wrong call raises TypeError, never crashes."""

from __future__ import annotations

import ctypes
import sysconfig
from pathlib import Path

import pytest
import torch

from kernels import cpu_build, int8_group_gemm_cpu, layer_ops_cpu, paged_attention_cpu

HEADERS = (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
pytestmark = pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler")


@pytest.mark.skipif(not HEADERS, reason="no Python headers: the kernels are called through ctypes")
def test_every_kernel_library_calls_its_functions_as_fast_calls() -> None:
    kernels = layer_ops_cpu.load_kernels()
    assert kernels is not None
    entries = [*kernels, paged_attention_cpu.load_kernel(), int8_group_gemm_cpu.load_kernel()]
    assert all(type(fn).__name__ == "builtin_function_or_method" for fn in entries), entries


def _rms_norm_both_ways() -> tuple[object, object]:
    """(fast call, ctypes function) of the same library's tandem_rms_norm."""
    lib = cpu_build.load_library(layer_ops_cpu.SOURCE, "the CPU layer kernels", "the references",
                                 layer_ops_cpu.BUILD_FLAGS)
    assert lib is not None
    fast = cpu_build.fast_calls(lib, layer_ops_cpu.SOURCE)
    if fast is None:
        pytest.skip("built without the fast calls (no Python headers)")
    fn = lib.tandem_rms_norm
    fn.restype, fn.argtypes = ctypes.c_int, layer_ops_cpu._SIGNATURES["rms_norm"]
    return fast.rms_norm, fn


@pytest.mark.parametrize("residual", [False, True])
def test_a_fast_call_writes_what_the_ctypes_call_writes(residual: bool) -> None:
    fast, slow = _rms_norm_both_ways()
    torch.manual_seed(0)
    x, res, w = torch.randn(5, 24), torch.randn(5, 24), torch.randn(24)
    outs = []
    for fn in (fast, slow):
        out, res_out = torch.zeros(5, 24), torch.zeros(5, 24)
        rc = fn(x.data_ptr(), 24, res.data_ptr() if residual else None, 24, w.data_ptr(), out.data_ptr(),
                res_out.data_ptr() if residual else None, 5, 24, 1e-6, 0)  # fmt: skip
        assert rc == 0
        outs.append((out, res_out))
    (a, ra), (b, rb) = outs
    assert torch.equal(a, b) and torch.equal(ra, rb)
    assert a.abs().sum() > 0 and (ra.abs().sum() > 0) == residual


def test_a_fast_call_with_wrong_arguments_raises_type_error() -> None:
    fast, _ = _rms_norm_both_ways()
    with pytest.raises(TypeError, match="rms_norm takes 11 arguments, got 2"):
        fast(0, 0)
    with pytest.raises(TypeError):
        fast("not a pointer", 24, None, 24, 0, 0, None, 5, 24, 1e-6, 0)
    with pytest.raises(TypeError):
        fast(0, 24, None, 24, 0, 0, None, 5, 24, "eps", 0)
