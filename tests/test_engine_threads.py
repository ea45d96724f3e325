"""Gene chunks on threads (causarray.engine.threads): same numbers on any thread count."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from causarray.engine import Design, groups_from_onehot
from causarray.engine.threads import chunk_threads, map_chunks, one_thread_blas, pass_threads
from causarray.factor_model import fisher_pass
from causarray.glm import fit_glm


def _blas_counts() -> list[int]:
    return [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]


def _problem(n=600, p=300, d=10, a=3, seed=0):
    rng = np.random.default_rng(seed)
    X = np.hstack([np.ones((n, 1)), rng.standard_normal((n, d - 1))])
    g = np.arange(n) % (a + 1)
    A = np.zeros((n, a))
    A[g < a, g[g < a]] = 1.0
    eta = 0.3 * X[:, 1:4].sum(1, keepdims=True) + rng.normal(0.5, 0.5, (1, p)) + A @ rng.normal(0, .3, (a, p))
    Y = rng.negative_binomial(5, 5 / (5 + np.exp(eta))).astype(float)
    return Y, X, A


def test_results_come_in_order_and_at_most_twice_the_threads_are_held():
    held, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        time.sleep(0.002 * (i % 3))
        return i

    out = []
    for i in map_chunks(work, range(40), threads=3):
        out.append(i)
        with lock:
            held[0] -= 1
    assert out == list(range(40))
    assert peak[0] <= 6


def test_one_thread_blas_is_restored_by_the_last_thread_out():
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_counts()
        with one_thread_blas():
            assert set(_blas_counts()) == {1}
            with one_thread_blas():               # nested (another batch): still one
                assert set(_blas_counts()) == {1}
            assert set(_blas_counts()) == {1}
        assert _blas_counts() == before


def test_chunk_threads_sets_the_threads_of_this_thread_only():
    with threadpool_limits(limits=2, user_api="blas"), chunk_threads(3):
        assert pass_threads() == 3
        seen = []
        t = threading.Thread(target=lambda: seen.append(pass_threads()))
        t.start()
        t.join()
        assert seen == [2]                         # another thread: the BLAS count
    assert pass_threads() == max(_blas_counts() or [1])


def test_an_error_in_a_chunk_reaches_the_caller():
    def boom(i):
        if i == 2:
            raise ValueError("chunk 2 failed")
        return i

    with pytest.raises(ValueError, match="chunk 2 failed"):
        list(map_chunks(boom, range(5), threads=2))


@pytest.mark.parametrize("threads", [2, 3])
def test_glm_and_fisher_pass_are_identical_on_any_thread_count(threads):
    Y, X, A = _problem()
    with one_thread_blas():
        ref = fit_glm(Y, X, A, compute_se=True, chunk_size=32)
        with chunk_threads(threads):
            got = fit_glm(Y, X, A, compute_se=True, chunk_size=32)
        for field in ("coef", "se", "size", "deviance", "n_iter"):
            np.testing.assert_array_equal(getattr(got, field), getattr(ref, field))
        design = Design.build(X[:, :7], groups_from_onehot(A), A.shape[1], np.zeros(len(X)))
        B0 = np.zeros((design.d, Y.shape[1]))
        B0[0] = np.log(Y.mean(0) + 0.1) * design.scales[0]
        C0 = np.zeros((A.shape[1], Y.shape[1]))
        alpha = np.full(Y.shape[1], 0.2)
        runs = []
        for k in (1, threads):
            B, C = B0.copy(), C0.copy()
            res = fisher_pass(Y, design, B, C, alpha, loadings=slice(4, 7), compute_se=True,
                              chunk=40, threads=k)
            runs.append((B, C, res))
        (B1, C1, r1), (Bk, Ck, rk) = runs
        for x, y in [(B1, Bk), (C1, Ck), (r1.kernel, rk.kernel), (r1.H, rk.H), (r1.g, rk.g),
                     (r1.var_b, rk.var_b), (r1.var_c, rk.var_c)]:
            np.testing.assert_array_equal(x, y)
        assert r1.n_halved == rk.n_halved
