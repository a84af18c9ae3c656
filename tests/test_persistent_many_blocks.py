"""Persistent sweeps on grids of 2-5 blocks under the many-block simulator (kernels/numba_sim.py): every thread of
every block runs at once, syncthreads is a per-block barrier, grid.sync() a barrier over all blocks, each block has
its own shared memory, and every global and shared memory access is checked for races. Forward and backward of
every cell and of the Jordan network, float32 and float64, against the float64 NumPy reference; a kernel whose
grid barrier is removed (or weakened to a block barrier, as Numba's own simulator runs it) must fail.
"""
import dataclasses
import functools
import warnings

import numpy as np
import pytest
from numba import cuda

from gpurnn.kernels import numba_cuda as N
from gpurnn.kernels import numba_plan, numba_sim
from test_numba_cuda import TOL, run_jordan, run_numba_sweep, run_reference_sweep, sweep_problem
from util import CELLS

pytestmark = pytest.mark.skipif(not N.simulator(), reason="the many-block harness runs in the simulator")

# name: (SMs of the simulated device, T, B, H, lengths, layout). H is never a multiple of the units per block, so
# the last block is short; B = 9 and 7 end on a partial batch tile. Layouts: "one tile" plans one batch tile per
# pass (as if shared memory held no more); "split" plans 2 units per block and blocks of 4 warps, so that every
# dot product is split over several warps.
CASES = {"2 blocks B1": (2, 3, 1, 5, [3], None),
         "3 blocks B9": (3, 3, 9, 10, [3, 1, 2, 3, 3, 2, 1, 3, 2], None),
         "4 blocks B7, a pass per tile": (4, 2, 7, 13, [2, 1, 2, 2, 1, 2, 1], "one tile"),
         "5 blocks B4": (5, 2, 4, 17, [2, 1, 2, 2], None),
         "3 blocks B2, split dot products": (3, 2, 2, 5, [2, 1], "split")}


def simulated_device(monkeypatch, sms, layout=None):
    """Make the planner see a simulated device of `sms` SMs, with the planner's knobs set for `layout`."""
    device = dataclasses.replace(numba_plan.SIMULATOR, sms=sms, max_threads=128 if layout == "split" else 64)
    monkeypatch.setattr(N, "current_device", lambda: device)
    if layout == "one tile":
        layout_launch = numba_plan.layout_launch
        monkeypatch.setattr(numba_plan, "layout_launch", lambda B, *args: layout_launch(min(B, 4), *args))
    if layout == "split":
        monkeypatch.setattr(numba_plan, "UNIT_QUANTUM", 1)
        monkeypatch.setattr(numba_plan, "MIN_K_PER_LANE", 0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_many_blocks_match_reference(monkeypatch, cell, dtype, case):
    sms, T, B, H, lengths, layout = CASES[case]
    simulated_device(monkeypatch, sms, layout)
    d, lens = sweep_problem(cell, T, B, H, lengths, dtype, np.random.default_rng(sms))
    ctx, got = run_numba_sweep(cell, d, lens, dtype, "persistent")
    plan = ctx.plan
    assert plan.sweep == "persistent" and plan.forward.blocks == plan.backward.blocks == sms
    assert H % plan.units != 0                                        # an uneven slice
    if layout == "one tile":
        assert plan.forward.tiles == plan.backward.tiles == 1 < -(-B // 4)
    if layout == "split":
        assert plan.forward.splits > 1 and plan.backward.splits > 1
    names = ["y"] + (["h_n", "c_n"] if cell == "lstm" else ["h_n"]) + ["dgx", "dgh"] + \
            (["dh0", "dc0"] if cell == "lstm" else ["dh0"])
    for name, a, b in zip(names, got, run_reference_sweep(cell, d, lens)):
        np.testing.assert_allclose(a, b, err_msg=name, **TOL[dtype])


# Jordan: (SMs, T, B, H, O, lengths, layout): hidden units and outputs both spread over the blocks, unevenly; in
# the first two some blocks own no output.
JORDAN_CASES = {"3 blocks B9": (3, 3, 9, 10, 6, [3, 1, 2, 3, 3, 2, 1, 3, 2], None),
                "5 blocks B4": (5, 2, 4, 17, 9, [2, 1, 2, 2], None),
                "3 blocks B2, split dot products": (3, 2, 2, 5, 3, [2, 1], "split")}


@pytest.mark.parametrize("case", list(JORDAN_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act,out_act", [("tanh", "sigmoid"), ("relu", "identity")])
def test_many_blocks_jordan_matches_reference(monkeypatch, act, out_act, dtype, case):
    sms, T, B, H, O, lengths, layout = JORDAN_CASES[case]
    simulated_device(monkeypatch, sms, layout)
    got, want, ctx = run_jordan(act, out_act, dtype, "persistent", T, B, H, O, lengths, np.random.default_rng(sms))
    assert ctx.plan.forward.blocks == sms and H % ctx.plan.units != 0
    if layout == "split":
        assert ctx.plan.forward.splits > 1
    for name, a, b in zip(["y", "y_n", "dph", "dpy", "dy0", "h"], got, want):
        np.testing.assert_allclose(a, b, err_msg=name, **TOL[dtype])


@pytest.mark.parametrize("grid_sync,memory", [("none", "memory"), ("block", "global memory")])
def test_harness_catches_a_missing_grid_barrier(monkeypatch, grid_sync, memory):
    """The same LSTM kernels with grid.sync() removed, or run as a block barrier: the race check must fire."""
    simulated_device(monkeypatch, 3)
    monkeypatch.setattr(numba_sim, "launch", functools.partial(numba_sim.launch, grid_sync=grid_sync))
    d, lens = sweep_problem("lstm", 3, 4, 10, [3, 2, 3, 1], np.float64, np.random.default_rng(0))
    with pytest.raises(numba_sim.RaceError, match=memory):
        run_numba_sweep("lstm", d, lens, np.float64, "persistent")


def test_refused_launch_runs_per_step_with_one_warning(monkeypatch):
    monkeypatch.setattr(N, "_refused", set())

    def refuse(blocks, threads, shared):
        raise numba_sim.LaunchRefused("too large a cooperative grid")
    monkeypatch.setattr(numba_sim, "admit", refuse)
    d, lens = sweep_problem("gru", 3, 2, 5, [3, 2], np.float64, np.random.default_rng(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [run_numba_sweep("gru", d, lens, np.float64, "auto") for _ in range(2)]
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == \
        ["persistent sweep not launched (too large a cooperative grid); running it per step"]
    want = run_reference_sweep("gru", d, lens)
    for ctx, got in results:
        assert ctx.sweep == "step"
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, **TOL[np.float64])


# The harness on its own: a barrier, a shuffle and a race in kernels small enough to read.

@cuda.jit
def neighbour(out, barrier):
    """out[b, i] = thread i+1's value in block b, passed through shared memory."""
    sm = cuda.shared.array(0, dtype=out.dtype)
    i = cuda.threadIdx.x
    sm[i] = cuda.blockIdx.x * 100 + i
    if barrier:
        cuda.syncthreads()
    out[cuda.blockIdx.x, i] = sm[(i + 1) % cuda.blockDim.x]


@cuda.jit
def warp_sum(x, out):
    """out[w] = the sum of x over warp w, by an xor butterfly."""
    i = cuda.grid(1)
    v = x[i]
    for offset in (16, 8, 4, 2, 1):
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, offset)
    if i % 32 == 0:
        out[i // 32] = v


def test_harness_blocks_have_their_own_shared_memory_and_barrier():
    out = np.zeros((3, 32))
    numba_sim.launch(neighbour, 3, 32, 32 * 8, (out, True))
    np.testing.assert_array_equal(out, np.arange(3)[:, None] * 100 + (np.arange(32)[None, :] + 1) % 32)
    with pytest.raises(numba_sim.RaceError, match="shared memory"):
        numba_sim.launch(neighbour, 3, 32, 32 * 8, (out, False))


def test_harness_shuffles_within_each_warp():
    x = np.random.default_rng(2).standard_normal(128)
    out = np.zeros(4)
    numba_sim.launch(warp_sum, 2, 64, 0, (x, out))
    np.testing.assert_allclose(out, x.reshape(4, 32).sum(axis=1))
