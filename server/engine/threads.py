"""CPU threads: only the engine's loop thread runs torch multi-threaded.

torch's CPU kernels (and bitsandbytes') use OpenMP (libgomp), which gives every thread that opens
a parallel region a pool of workers of its own. A pool left idle by another thread still counts:
once the process holds more OpenMP threads than CPUs, libgomp spins only briefly before a worker
sleeps, and each of the engine's many small parallel regions (hundreds per step) pays a wake-up:
on a 2-core machine one idle pool beside the loop thread's makes every small matmul of a step
markedly slower.

So: the model loads on a thread of its own that then ends (`run_on_own_thread`: its pool ends
with it); helper threads that touch torch (request preparation, adapter validation, uploads,
merging adapter mixtures) run their parallel regions alone (`single_threaded`); the loop thread
sets the configured count (`loop_threads`), which OpenMP keeps per thread. MKL, torch's LAPACK
on x86 (`torch.linalg.qr`, `svd`: the svd mixture merge), opens its OpenMP regions with a count
of its own, so a helper thread sets that one to 1 as well: a load worker left holding MKL's
pool slowed every later step by about a fifth.

Background work (adapter loads, validation and hashing of uploads) also runs at the lowest CPU
priority (`background`: nice 19 for that thread alone, which Linux keeps per thread; the load
threads take `--load-nice`), so on a
busy machine the kernel gives the step loop's threads the CPU first and a burst of cold adapters
slows the running batch little (at normal priority a third busy thread preempts one of the
step's OpenMP threads, and every parallel region waits for it); on an idle machine the loads run
at full speed. benchmarks/reports/isolation.md measures the step time at several nice values.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
BACKGROUND_NICE = 19  # the lowest priority: the kernel weighs such a thread ~1/70 of a normal one


def single_threaded() -> None:
    """This thread's OpenMP parallel regions run on this thread alone: it never holds a pool.

    OpenMP's per-thread setting, not torch.set_num_threads, which would also switch off ATen's
    parallel loops in every thread (its thread count is process-wide). ATen sets this thread's
    OpenMP count from its own once, lazily, on the thread's first parallel call; asking it for the
    count runs that first, so that 1 stays."""
    libgomp = _libgomp()
    if libgomp is not None:
        torch.get_num_threads()  # ATen's per-thread lazy init, which would overwrite the 1
        libgomp.omp_set_num_threads(1)
    mkl = _mkl()
    if mkl is not None:
        mkl.MKL_Set_Num_Threads_Local(1)  # this thread's MKL calls, OpenMP's count aside


def background(nice: int = BACKGROUND_NICE) -> None:
    """Makes this thread a background one: torch single-threaded, and `nice` steps nicer than
    it was (Linux: per thread; elsewhere a no-op)."""
    single_threaded()
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (AttributeError, OSError):  # no per-thread priorities here: run at normal priority
        pass


def loop_threads(threads: int) -> None:
    """Called on the engine's loop thread: its parallel regions use `threads` (0 = leave the
    OpenMP default, one per CPU)."""
    if threads:
        torch.set_num_threads(threads)


def run_on_own_thread(fn: Callable[[], T], name: str) -> Future:
    """Runs fn() on a new thread that ends afterwards; the future holds its result or error."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():  # cancelled before it started
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    """The MKL torch links in (x86 builds export its C service functions from libtorch_cpu);
    None without it (another BLAS: nothing to do)."""
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu*.so*")):
        try:
            library = ctypes.CDLL(str(path))
        except OSError:
            continue
        if hasattr(library, "MKL_Set_Num_Threads_Local"):
            return library
    return None


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on: its bundled libgomp, else the system's; None when
    there is neither (a build on another runtime: nothing to do)."""
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    candidates = [str(path) for path in bundled] + [ctypes.util.find_library("gomp")]
    for candidate in candidates:
        if candidate:
            try:
                return ctypes.CDLL(candidate)
            except OSError:
                continue
    return None
