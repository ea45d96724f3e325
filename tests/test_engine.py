"""The shared pieces of the count-GLM engine: step cap, step halving, active set, layering."""
import ast
from pathlib import Path

import numpy as np
import pytest

from causarray.engine import (
    GROUP_COEF_BOUND,
    MAX_HALVING,
    MAX_NEWTON_STEP,
    ActiveSet,
    NewtonSystem,
    cap_step,
    halve_steps,
    step_size,
)

ENGINE = Path(__file__).resolve().parents[1] / "src" / "causarray" / "engine"


def _quadratic(target, calls, trials=None):
    """Objective ``sum_k (B_k - target)^2 + sum_k C_k^2`` per gene (column), mu = B."""

    def objective(B, C, cols):
        calls.append(None if cols is None else np.asarray(cols).copy())
        if trials is not None:
            trials.append(C.copy())
        t = target if cols is None else target[cols]
        return B.copy(), ((B - t) ** 2).sum(axis=0) + (C ** 2).sum(axis=0)

    return objective


def test_halve_steps_accepts_full_halved_and_stalled_steps():
    target = np.array([1.0, 1.0, 1.0])
    B0 = np.zeros((1, 3))
    C0 = np.zeros((0, 3))
    db = np.array([[1.0], [3.0], [-1.0]])     # exact, overshooting, ascent direction
    dc = np.zeros((0, 3))
    f0 = np.ones(3)
    calls = []
    res = halve_steps(_quadratic(target, calls), B0, C0, db, dc, f0, np.zeros(3))
    # gene 0: the full step reaches the minimum
    assert res.step[0] == 1.0 and res.B[0, 0] == 1.0 and res.f[0] == 0.0
    # gene 1: 3 overshoots (f = 4 > 1), 1.5 does not (f = 0.25)
    assert res.step[1] == 0.5 and res.B[0, 1] == 1.5 and res.f[1] == 0.25
    # gene 2: every fraction of an ascent step raises f: it stays where it was
    assert res.stalled.tolist() == [False, False, True]
    assert res.B[0, 2] == 0.0 and res.step[2] == 0.5 ** MAX_HALVING
    # only the rejected genes are evaluated again
    assert calls[0] is None
    assert calls[1].tolist() == [1, 2]
    assert all(c.tolist() == [2] for c in calls[2:])
    assert len(calls) == 1 + MAX_HALVING


def test_halve_steps_slack_and_group_clip():
    target = np.zeros(2)
    B0 = np.zeros((1, 2))
    C0 = np.zeros((1, 2))
    db = np.zeros((2, 1))
    dc = np.array([[1e-6, -2 * GROUP_COEF_BOUND]])
    f0 = np.zeros(2)
    trials = []
    res = halve_steps(_quadratic(target, [], trials), B0, C0, db, dc, f0,
                      np.array([1e-11, 1e-11]))
    # f rises by 1e-12 < slack for gene 0: accepted as a full step
    assert res.step[0] == 1.0 and not res.stalled[0]
    # gene 1's group trial is clipped to -GROUP_COEF_BOUND before it is evaluated; it
    # never helps, so the gene keeps its starting point
    assert trials[0][0, 1] == -GROUP_COEF_BOUND and trials[1][0, 0] == -GROUP_COEF_BOUND
    assert res.stalled[1] and res.C[0, 1] == 0.0


def test_cap_step_scales_whole_steps():
    rng = np.random.default_rng(0)
    db = rng.normal(scale=4.0, size=(50, 3))
    dc = rng.normal(scale=4.0, size=(2, 50))
    db0, dc0 = db.copy(), dc.copy()
    shrink = cap_step(db, dc)
    big = step_size(db0, dc0)
    assert np.all(step_size(db, dc) <= MAX_NEWTON_STEP * (1 + 1e-12))
    np.testing.assert_array_equal(shrink == 1.0, big <= MAX_NEWTON_STEP)
    # the direction of every gene's step is kept
    np.testing.assert_allclose(db, db0 * shrink[:, None], rtol=1e-15)
    np.testing.assert_allclose(dc, dc0 * shrink, rtol=1e-15)


def test_active_set_keep_trims_every_field_together():
    rng = np.random.default_rng(1)
    n, m, d, a = 7, 5, 2, 3
    Y = rng.poisson(2.0, (n, m)).astype(float)
    mu = rng.uniform(1, 3, (n, m))
    alpha = rng.uniform(0, 1, m)
    pinned = rng.random((a, m)) < 0.3
    pinb = rng.random((m, d)) < 0.3
    idx = np.array([0, 2, 3, 4])
    state = ActiveSet.start(idx, Y, mu, alpha, pinned, pinb)
    state.rel = rng.random(idx.size)
    state.system = NewtonSystem(rng.random((idx.size, d, d)), rng.random((a, idx.size, d)),
                                rng.random((a, idx.size)))
    before = (state.y, state.system)
    state.keep(np.ones(idx.size, bool))                  # all stay: nothing is copied
    assert state.y is before[0] and state.system is before[1]
    mask = np.array([True, False, True, False])
    S, E, Dr = state.system.S, state.system.E, state.system.Dr
    rel = state.rel
    state.keep(mask)
    cols = idx[mask]
    assert state.idx.tolist() == cols.tolist() and state.size == 2
    np.testing.assert_array_equal(state.y, Y[:, cols])
    np.testing.assert_array_equal(state.mu, mu[:, cols])
    np.testing.assert_array_equal(state.alpha, alpha[cols])
    np.testing.assert_array_equal(state.pinned, pinned[:, cols])
    np.testing.assert_array_equal(state.pinb, pinb[cols])
    np.testing.assert_array_equal(state.rel, rel[mask])
    np.testing.assert_array_equal(state.system.S, S[mask])
    np.testing.assert_array_equal(state.system.E, E[:, mask])
    np.testing.assert_array_equal(state.system.Dr, Dr[:, mask])


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda p: p.name)
def test_engine_imports_nothing_from_the_rest_of_the_package(path):
    # the standard library's pieces of a thread pool, and threadpoolctl (a dependency)
    # to give each chunk thread a one-thread BLAS (engine/threads.py)
    allowed = {"__future__", "dataclasses", "numpy", "scipy", "collections", "concurrent",
               "contextlib", "contextvars", "threading", "typing", "threadpoolctl"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level == 1, f"{path.name} imports from outside the engine"
            else:
                assert node.module.split(".")[0] in allowed, node.module
        elif isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in allowed for a in node.names)
