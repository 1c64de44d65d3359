"""TLR's fused CPU step (``cpu_step.cpp``), built on first use with torch's C++ extension tools,
and the Triton path's host-side pass over a group's tensors (``layout_record``, ``same_layout``).

``extension()`` gives the compiled module, or None where it cannot be built (no C++ compiler,
no ninja, or ``TLR_CPU_KERNEL=0`` in the environment): the PyTorch path then runs torch's own
ops, with a warning that says why, and the Triton path checks every tensor at every step. The
build takes about half a minute once (on a GPU machine: at the first step on the Triton path);
torch caches it (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and
rebuilds it only when the source or the flags change.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

_SOURCE = Path(__file__).with_name("cpu_step.cpp")
_LOADED: list = []  # [module or None], once tried


def _flags() -> list[str]:
    """-O3, and AVX2/FMA where this CPU has them (not -march=native: a cached build may be
    loaded on another machine sharing the home directory; the flags are part of torch's
    cache key, so a machine without AVX2 gets its own build)."""
    flags = ["-O3"]
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    if " avx2" in cpu and " fma" in cpu:
        flags += ["-mavx2", "-mfma"]
    return flags


@contextmanager
def _ninja_on_path():
    """torch's builder runs ``ninja`` from PATH; pip's ``ninja`` (a dependency) puts it beside the
    interpreter, which is not on PATH when a virtual environment's python runs unactivated."""
    old = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, old])
        except (ImportError, AttributeError):
            pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


# OpenMP: ``at::parallel_for`` is a ``#pragma omp parallel`` in ATen's headers, compiled into the
# module, so without -fopenmp the step runs on one thread (timed by hand, 2 threads: 1.6× slower on
# 795k parameters, 1.8× on 10M). The module links libgomp by its soname: at run time it
# shares the copy torch has loaded, and torch's thread count. A compiler without OpenMP builds
# the one-thread module instead.
_OPENMP = (["-fopenmp"], ["-fopenmp"])
_SERIAL = ([], [])


def extension():
    """The compiled ``cpu_step`` module, or None (see the module docstring)."""
    if not _LOADED:
        module = None
        if os.environ.get("TLR_CPU_KERNEL", "1") != "0":
            errors = []
            for cflags, ldflags in (_OPENMP, _SERIAL):
                try:
                    from torch.utils.cpp_extension import load  # needs setuptools, which a venv may lack

                    with _ninja_on_path():
                        module = load(name="tlr_cpu_step", sources=[str(_SOURCE)], extra_cflags=_flags() + cflags,
                                      extra_ldflags=ldflags, verbose=False)
                    break
                except Exception as exc:  # noqa: BLE001 - any build failure: try without OpenMP, then torch's ops
                    errors.append(f"{type(exc).__name__}: {exc}")
            if module is None:
                warnings.warn(f"tlr_triton: the native module (fused CPU step) could not be built ({errors[-1]}); "
                              "TLR runs on torch's own CPU ops (slower at a unit's end), and its Triton path checks "
                              "every tensor at every step", RuntimeWarning, stacklevel=3)
            elif errors:
                warnings.warn(f"tlr_triton: the fused CPU step was built without OpenMP ({errors[0]}): it runs on "
                              "one thread", RuntimeWarning, stacklevel=3)
        _LOADED.append(module)
    return _LOADED[0]


# The Triton path's host side (``layout`` in cpu_step.cpp): a group's layout record.
def layout_record(params):
    """An int64 [n, 7] record of ``params``' identities, addresses, sizes, dtypes, devices and
    contiguity and their gradients' (cpu_step.cpp, ``layout``), or None where the module is not
    built or a tensor is not plain (sparse, a DTensor or another subclass dispatching to Python)."""
    module = extension()
    if module is None:
        return None
    import torch

    record = torch.empty((len(params), module.layout_fields()), dtype=torch.int64)
    return record if module.layout(params, record, True, record) == SAME else None


def address_fields() -> slice:
    """The record's columns holding the weight's and the gradient's address, as a slice (a
    strided view of the record: writing it costs a fraction of an index list's write)."""
    if not _ADDRESS_FIELDS:
        first, second = extension().layout_address_fields()
        _ADDRESS_FIELDS.append(slice(first, second + 1, second - first))
    return _ADDRESS_FIELDS[0]


_ADDRESS_FIELDS: list[slice] = []


SAME, MOVED, CHANGED = 0, 1, 2  # what ``same_layout`` finds


def same_layout(params, record, moved) -> int:
    """Whether ``params`` and their gradients are still as ``record`` (``layout_record``) holds
    them: SAME; MOVED where only addresses differ (each keeping its 16-byte alignment or lack of
    it), their new ones then written to ``moved`` (int64 [n, 2]); CHANGED. Reads, never writes,
    the record."""
    module = _LOADED[0] if _LOADED else None
    return CHANGED if module is None else module.layout(params, record, False, moved)
