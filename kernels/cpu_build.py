"""Building Tandem's C++ CPU kernels on first use: compile once per machine, cache, load with ctypes.

:func:`load_library` compiles a kernel's source with the system C++ compiler (``$CXX``, else c++, g++
or clang++) against torch's headers, about 5 s, into :func:`cache_dir`, under a name hashing the source,
the flags, the compiler's version and torch's version; every later process only loads it. Concurrent
builders (two test processes) each write a temporary file and rename it into place. Where there is no
compiler, or the build or the load fails, it logs why once per kernel (the caller caches its answer)
and returns None, and the caller keeps its PyTorch reference.

Where Python's headers are installed, each library is also a Python extension module
(``-DTANDEM_PYFAST``, kernels/pyfast.h): :func:`fast_calls` loads its entry points, which take the C
functions' arguments as they are and cost ~0.3 us a call where ctypes' argument conversion costs ~4 us
for 25 arguments (a layer makes five to seven such calls). Without the headers the same C functions are
called through ctypes.

Used by kernels/paged_attention_cpu.py, kernels/int8_group_gemm_cpu.py and kernels/layer_ops_cpu.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

HEADER = Path(__file__).with_name("pyfast.h")  # part of every build's key: the sources include it


def cache_dir() -> Path:
    """$TANDEM_CACHE_DIR/kernels, else $XDG_CACHE_HOME/tandem/kernels, else ~/.cache/tandem/kernels."""
    root = os.environ.get("TANDEM_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "tandem") if xdg else str(Path.home() / ".cache" / "tandem")
    return Path(root) / "kernels"


def compiler() -> str | None:
    """The first of $CXX, c++, g++, clang++ on the PATH, or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def flags() -> list[str]:
    """Compiler flags: optimised shared library, OpenMP, torch's headers and libraries."""
    torch_dir = Path(torch.__file__).parent
    # AVX2 + FMA where torch itself dispatches to them; no -march=native, so a cache directory
    # shared between machines never hands one a library the other cannot run.
    isa = ["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
    py_include = Path(sysconfig.get_paths()["include"])
    pyfast = [f"-I{py_include}", "-DTANDEM_PYFAST"] if (py_include / "Python.h").exists() else []
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", *isa, f"-I{torch_dir / 'include'}", *pyfast,
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu"]  # fmt: skip


def build(source: Path, cxx: str, out_dir: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` with :func:`flags` and ``extra_flags`` into ``out_dir`` unless an identical
    build is there; returns the library, ``<source stem>-<hash>.so``. Raises OSError (cannot write) or
    subprocess.CalledProcessError / TimeoutExpired (the compiler)."""
    opts = [*flags(), *extra_flags]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), HEADER.read_text(), *opts, version, torch.__version__,
                   platform.machine()]).encode()
    ).hexdigest()[:16]
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([cxx, str(source), "-o", tmp, *opts], check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load_library(source: Path, what: str, fallback: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """``source`` compiled (if needed, with ``extra_flags`` after :func:`flags`) and loaded; None, with one
    warning naming ``what`` (the kernel) and ``fallback`` (what runs instead), when there is no compiler
    or the build or load fails."""
    cxx = compiler()
    if cxx is None:
        log.warning("no C++ compiler ($CXX, c++, g++, clang++): %s uses %s", what, fallback)
        return None
    try:
        return ctypes.CDLL(str(build(source, cxx, cache_dir(), extra_flags)))
    except subprocess.CalledProcessError as e:
        log.warning("building %s failed, using %s: %s", what, fallback, e.stderr.strip()[-2000:])
        return None
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s is unavailable, using %s: %s", what, fallback, e)
        return None


def fast_calls(lib: ctypes.CDLL, source: Path) -> ModuleType | None:
    """``lib`` (built from ``source``) loaded as the extension module ``tandem_<source stem>``, whose
    functions are the library's ``tandem_<name>`` C functions as Python fast calls (kernels/pyfast.h);
    None where it was built without them (no Python headers) or the load fails (logged)."""
    name = f"tandem_{source.stem}"
    if not hasattr(lib, f"PyInit_{name}"):
        return None
    try:
        loader = importlib.machinery.ExtensionFileLoader(name, str(lib._name))
        spec = importlib.util.spec_from_file_location(name, str(lib._name), loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except (ImportError, OSError) as e:
        log.warning("%s's fast calls are unavailable, using ctypes: %s", source.name, e)
        return None


def entry_points(lib: ctypes.CDLL, source: Path, signatures: Mapping[str, list[Any]]) -> dict[str, Callable[..., int]]:
    """name -> the C function ``tandem_<name>`` of ``lib``, each returning its int: the fast call where
    the library has them (:func:`fast_calls`), else through ctypes with ``signatures[name]`` as its
    argtypes. Either takes the same arguments (pointers as ints or None)."""
    fast = fast_calls(lib, source)
    fns: dict[str, Callable[..., int]] = {}
    for name, argtypes in signatures.items():
        if fast is not None:
            fns[name] = getattr(fast, name)
            continue
        fn = getattr(lib, f"tandem_{name}")
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
        fns[name] = fn
    return fns
