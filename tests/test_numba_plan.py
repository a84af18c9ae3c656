"""The launch planner of the numba backend (numba_plan.py) on described devices: no GPU needed."""
import dataclasses

import pytest

from gpurnn.kernels import numba_plan as P
from gpurnn.kernels.numba_persistent import MAX_THREADS, WARP

DEVICES = {"H100": P.H100_SXM, "A100": P.A100_SXM, "simulator": P.SIMULATOR}


@pytest.mark.parametrize("device,H", [(P.H100_SXM, 1024), (P.A100_SXM, 512)])
@pytest.mark.parametrize("B", [1, 4, 8])
def test_lstm_float32_runs_persistent_at_small_batch(device, H, B):
    """LSTM H=1024 on a 132-SM H100 (16 MiB of W_hh in 128 blocks of 8 units); an A100's 108 x 163 KiB cannot
    hold that slice and a batch tile, so it gets H=512."""
    plan = P.plan("auto", B, H, 4, 4, device)
    assert plan.sweep == "persistent", plan.reason
    assert plan.forward.blocks <= device.sms and plan.units * plan.forward.blocks >= H


def test_few_items_split_their_dot_products():
    """LSTM H=512 on an H100: 4 units per block, so a batch tile is 4 forward items and 1 backward item; the
    8 warps of a block split each dot product in 2 (forward) and 8 (backward)."""
    plan = P.plan("auto", 4, 512, 4, 4, P.H100_SXM)
    assert (plan.units, plan.forward.splits, plan.backward.splits) == (4, 2, 8)
    assert plan.forward.threads == plan.backward.threads == 256


@pytest.mark.parametrize("B", [128, 256])
def test_large_batch_runs_per_step(B):
    assert P.plan("auto", B, 1024, 4, 4, P.H100_SXM).sweep == "step"


def test_weights_that_do_not_fit_run_per_step_and_cannot_be_forced():
    plan = P.plan("auto", 4, 4096, 4, 4, P.H100_SXM)   # W_hh: 256 MiB against 132 x 227 KiB of shared memory
    assert plan.sweep == "step" and "shared memory" in plan.reason
    with pytest.raises(ValueError, match="sweep='persistent'"):
        P.plan("persistent", 4, 4096, 4, 4, P.H100_SXM)


def test_sweep_forces_either_path():
    assert P.plan("step", 4, 64, 4, 4, P.H100_SXM).sweep == "step"
    assert P.plan("persistent", 256, 1024, 4, 4, P.H100_SXM).sweep == "persistent"
    with pytest.raises(ValueError, match="sweep must be one of"):
        P.plan("fused", 4, 64, 4, 4, P.H100_SXM)


def test_no_cooperative_launch_runs_per_step():
    device = dataclasses.replace(P.H100_SXM, cooperative=False)
    assert P.plan("auto", 4, 256, 4, 4, device).sweep == "step"
    with pytest.raises(ValueError, match="cooperative"):
        P.plan("persistent", 4, 256, 4, 4, device)


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (9, 33), (16, 256), (64, 1000), (7, 1024)])
def test_layout_covers_every_unit_within_the_limits(device, itemsize, G, B, H):
    device = DEVICES[device]
    layout = P.persistent_layout(B, H, G, itemsize, device)
    fewest = -(-H // device.sms)
    if isinstance(layout, str):
        assert max(P.shared_elements(d, G, H, fewest, 1) for d in (False, True)) * itemsize > device.shared_per_block
        return
    units, fwd, bwd = layout
    assert units in (fewest, -(-fewest // P.UNIT_QUANTUM) * P.UNIT_QUANTUM)
    for backward, launch in ((False, fwd), (True, bwd)):
        assert launch.blocks <= device.sms
        assert (launch.blocks - 1) * units < H <= launch.blocks * units     # every unit, no empty block
        assert launch.shared == P.shared_elements(backward, G, H, units, launch.tiles, launch.threads,
                                                  launch.splits) * itemsize
        assert launch.shared <= device.shared_per_block
        assert 1 <= launch.tiles <= -(-B // 4)
        assert launch.threads % (WARP * launch.splits) == 0          # every split item in one round
        assert launch.threads <= min(device.max_threads, MAX_THREADS)


@pytest.mark.parametrize("B", [1, 4, 16])
def test_jordan_runs_persistent_when_its_weights_fit(B):
    plan = P.jordan_plan("auto", B, 1024, 64, 4, P.H100_SXM)
    assert plan.sweep == "persistent", plan.reason
    launch = plan.forward
    assert launch == plan.backward and launch.blocks <= P.H100_SXM.sms
    assert (launch.blocks - 1) * plan.units < 1024 <= launch.blocks * plan.units and plan.out_units * launch.blocks >= 64
    assert launch.shared == P.jordan_shared_elements(1024, 64, plan.units, plan.out_units, launch.tiles,
                                                     launch.threads, launch.splits) * 4
    assert launch.shared <= P.H100_SXM.shared_per_block


def test_jordan_too_large_runs_per_step():
    assert P.jordan_plan("auto", 4, 8192, 8192, 4, P.H100_SXM).sweep == "step"
    with pytest.raises(ValueError, match="sweep='persistent'"):
        P.jordan_plan("persistent", 4, 8192, 8192, 4, P.H100_SXM)
    assert P.jordan_plan("step", 4, 64, 8, 4, P.H100_SXM).sweep == "step"


class FakeGPU:
    """What numba's cuda.gpus[i] reports for an H100 SXM under CUDA 13, which no longer reports clock rates."""
    compute_capability = (9, 0)
    name = b"NVIDIA H100 80GB HBM3"
    MULTIPROCESSOR_COUNT = 132
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 232448
    MAX_REGISTERS_PER_MULTIPROCESSOR = 65536
    MAX_THREADS_PER_BLOCK = 1024
    COOPERATIVE_LAUNCH = 1
    GLOBAL_MEMORY_BUS_WIDTH = 5120

    def __getattr__(self, name):
        raise AttributeError(name)


def test_device_read_from_numba_attributes():
    device = P.describe(FakeGPU())
    assert (device.name, device.sms, device.shared_per_block, device.fma_per_sm_clock) == \
        ("NVIDIA H100 80GB HBM3", 132, 232448, {4: 128, 8: 64})
    assert device.clock_hz == P.DEFAULT_CLOCK_HZ and device.cooperative
    assert P.plan("auto", 4, 1024, 4, 4, device).sweep == "persistent"
