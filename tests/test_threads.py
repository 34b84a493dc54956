"""Helper threads run torch single-threaded: OpenMP's count and MKL's own (torch's LAPACK), so
that no pool of theirs sits beside the step loop's (server/engine/threads.py)."""

from __future__ import annotations

import threading

import pytest

from server.engine import threads


def _on_new_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


def test_a_single_threaded_helper_runs_openmp_and_mkl_on_one_thread():
    libgomp, mkl = threads._libgomp(), threads._mkl()
    if libgomp is None or mkl is None:
        pytest.skip("this torch build has no libgomp or no MKL")

    def counts():
        threads.single_threaded()
        return libgomp.omp_get_max_threads(), mkl.MKL_Get_Max_Threads()

    assert _on_new_thread(counts) == (1, 1)
    # per thread: another thread keeps the process's counts (2 cores here)
    assert _on_new_thread(lambda: mkl.MKL_Get_Max_Threads()) > 1
