"""Launch plans for the numba backend's sweeps: persistent (one cooperative launch per layer and direction) or
per-step (a GEMM and a fused pointwise kernel per step), with the persistent grid, block and W_hh split.

`plan(sweep, B, H, G, itemsize, device)` (and `jordan_plan` for the Jordan network) lays out a persistent sweep for
the device and, for sweep="auto", takes it when it fits on chip and the cost model below says it is faster than
the per-step sweep; "persistent" and "step" force either path.

Layout (numba_persistent.py): each block owns `units` hidden units, as few as the SM count allows and a multiple
of 4 (UNIT_QUANTUM) where that still fits, so there is at most one block per SM and each block's shared memory
holds its W_hh slice (forward G*units rows, backward `units` columns) plus `tiles` staged batch tiles of 4 rows;
`tiles` is as many as fit, up to the whole batch (one staging pass per step). One warp works on one (tile, lane
group) item at a time; a block gets as many warps as it has items per pass, within the kernel's launch bounds
and the device; when it has fewer items than warps, each dot product is split over `splits` warps.

Registers: the plan launches one block per SM, never more: the block's W_hh slice fills the SM's shared memory,
and the grid barrier needs every block resident at once, which one block per SM guarantees. So the kernels are
compiled with launch bounds (256 threads, 1 block), which lets ptxas use up to 255 registers without spilling
(sm_80: 160-220, sm_90: 90-130, from python -m gpurnn.kernels.sass); on sm_90 the float32 kernels would still fit
2 blocks of 256 threads.

Cost model, per step and direction (estimates from the device's datasheet class, NOT measurements; a run on a
GPU replaces them with measured values, see docs/PERFORMANCE.md):
- persistent: GRID_BARRIER_S + per pass (staging the tiles through L2 + a warp's items, each ceil(K/(32*splits))
  hot-loop iterations of R*4 FMAs at HOT_LOOP_INSTR_PER_FMA issue slots plus ITEM_OVERHEAD_CLOCKS for the
  shuffle reduction and the pointwise math; warps beyond the SM's 4 schedulers share them);
- per-step: max(host time of its launches, device time of the GEMM (W_hh streamed from memory, or its FLOPs)
  + POINTWISE_KERNEL_S).
"""
import dataclasses
from dataclasses import dataclass

from .numba_persistent import BT, MAX_THREADS, WARP, rows_per_group, sums_per_lane, units_per_group

SWEEPS = ("auto", "persistent", "step")
UNIT_QUANTUM = 4              # units per block: a multiple of 4, since a backward lane group covers 4 columns
                              # and an Elman forward lane group 4 units (fewer would leave their lanes idle)
SCHEDULERS_PER_SM = 4         # warp schedulers of an SM (Volta .. Hopper): at most 4 warps issue per clock
MIN_K_PER_LANE = 4            # split a dot product over warps only while each lane keeps >= 4 of its K products
                              # (0: no such limit)
GRID_BARRIER_S = 1.5e-6       # one grid-wide barrier: each block's arrival and release through L2
HOT_LOOP_INSTR_PER_FMA = 1.5  # SASS instructions per FMA of the persistent hot loop (python -m gpurnn.kernels.sass)
ITEM_OVERHEAD_CLOCKS = 600    # per item: <= 24 dependent shuffles (~30 clocks each) plus the pointwise math
SPLIT_OVERHEAD_CLOCKS = 200   # per split item: two block barriers and the partial sums through shared memory
L2_BYTES_PER_SM_CLOCK = 32    # what one SM reads from L2 per clock when it stages the step's vector
HOST_LAUNCHES_PER_STEP = 2    # the per-step sweep: one GEMM (cuBLAS through CuPy) + one Numba kernel per step
HOST_LAUNCH_S = 5e-6          # host time of one launch: the low end of Numba's 5-20 us, about CuPy's GEMM call
POINTWISE_KERNEL_S = 2e-6     # device time of the tiny fused pointwise kernel of one step
GEMM_EFFICIENCY = 0.5         # share of peak FLOP/s and bandwidth cuBLAS reaches on a (B, H) x (H, G*H) product


@dataclass(frozen=True)
class Device:
    """What a plan needs to know about a GPU (read from it by numba_cuda.current_device, or described)."""
    name: str
    sms: int                  # multiprocessors
    shared_per_block: int     # bytes of shared memory a block may opt in to
    registers_per_sm: int
    clock_hz: float
    fma_per_sm_clock: dict    # itemsize -> FMA lanes per SM per clock (4: FP32, 8: FP64)
    memory_bytes_per_s: float
    cooperative: bool = True  # cooperative launch supported (else grid.sync() cannot run)
    max_threads: int = 1024   # threads per block


# Described devices: datasheet figures, for the planner's tests and for reading plans without a GPU.
H100_SXM = Device("H100 SXM", sms=132, shared_per_block=227 * 1024, registers_per_sm=65536, clock_hz=1.755e9,
                  fma_per_sm_clock={4: 128, 8: 64}, memory_bytes_per_s=3.35e12)
A100_SXM = Device("A100 SXM", sms=108, shared_per_block=163 * 1024, registers_per_sm=65536, clock_hz=1.41e9,
                  fma_per_sm_clock={4: 64, 8: 32}, memory_bytes_per_s=2.0e12)
# The simulator: a few small "SMs", so that tiny problems still spread over several blocks; blocks of 1-2 warps.
SIMULATOR = Device("CUDA simulator", sms=4, shared_per_block=48 * 1024, registers_per_sm=65536, clock_hz=1e9,
                   fma_per_sm_clock={4: 64, 8: 32}, memory_bytes_per_s=1e12, max_threads=2 * WARP)


# FMA lanes per SM (FP32, FP64) by compute capability, from NVIDIA's architecture whitepapers.
FMA_LANES_PER_SM = {(7, 0): (64, 32), (7, 5): (64, 2), (8, 0): (64, 32), (8, 6): (128, 2), (8, 7): (128, 2),
                    (8, 9): (128, 2), (9, 0): (128, 64), (10, 0): (128, 64), (12, 0): (128, 2)}


DEFAULT_CLOCK_HZ = 1.5e9           # when the driver no longer reports clock rates (CUDA 13 deprecates them)
DEFAULT_MEMORY_BYTES_PER_S = 2e12


def describe(gpu):
    """The Device of a Numba GPU object (cuda.gpus[i]), read from its attributes."""
    def attribute(name, default=None):
        try:
            return getattr(gpu, name)
        except Exception:   # noqa: BLE001 - an attribute this driver does not report
            return default
    fp32, fp64 = FMA_LANES_PER_SM.get(tuple(gpu.compute_capability), (64, 2))
    name = gpu.name.decode() if isinstance(gpu.name, bytes) else str(gpu.name)
    clock_khz, memory_khz, bus_bits = (attribute(a) for a in ("CLOCK_RATE", "MEMORY_CLOCK_RATE",
                                                                "GLOBAL_MEMORY_BUS_WIDTH"))
    return Device(name, sms=gpu.MULTIPROCESSOR_COUNT, shared_per_block=gpu.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                  registers_per_sm=gpu.MAX_REGISTERS_PER_MULTIPROCESSOR,
                  clock_hz=clock_khz * 1e3 if clock_khz else DEFAULT_CLOCK_HZ,
                  fma_per_sm_clock={4: fp32, 8: fp64},
                  memory_bytes_per_s=(2 * memory_khz * 1e3 * bus_bits / 8 if memory_khz and bus_bits
                                      else DEFAULT_MEMORY_BYTES_PER_S),
                  cooperative=bool(attribute("COOPERATIVE_LAUNCH", False)),
                  max_threads=gpu.MAX_THREADS_PER_BLOCK)


@dataclass(frozen=True)
class Launch:
    """One persistent kernel launch: grid, block, dynamic shared memory, batch tiles staged per pass, warps
    per dot product."""
    blocks: int
    threads: int
    shared: int               # bytes
    tiles: int
    splits: int = 1


@dataclass(frozen=True)
class Plan:
    sweep: str                # "persistent" | "step"
    units: int = 0            # hidden units per block (persistent)
    forward: Launch = None
    backward: Launch = None
    reason: str = ""
    out_units: int = 0        # Jordan: outputs per block


def ceil_div(a, b):
    return -(-a // b)


def shared_elements(backward, G, H, units, tiles, threads=0, splits=1):
    """Elements of dynamic shared memory a persistent kernel uses (the layout of numba_persistent.py)."""
    partials = threads * sums_per_lane(G, backward) if splits > 1 else 0
    if backward:
        return ceil_div(units, 4) * 4 * G * H + tiles * BT * G * H + partials
    w = ceil_div(units, units_per_group(G, False)) * H * rows_per_group(G, False)
    return ceil_div(w, BT) * BT + tiles * BT * H + partials


def persistent_layout(B, H, G, itemsize, device):
    """(units, forward Launch, backward Launch), or a string saying why W_hh does not fit on chip.

    units: ceil(H / SMs) rounded up to UNIT_QUANTUM, or ceil(H / SMs) itself when the rounded slice does not fit."""
    if not device.cooperative:
        return "the device has no cooperative launch"
    fewest = ceil_div(H, device.sms)
    why = ""
    for units in dict.fromkeys((ceil_div(fewest, UNIT_QUANTUM) * UNIT_QUANTUM, fewest)):
        launches = [layout_launch(B, H, G, itemsize, device, units, backward) for backward in (False, True)]
        if None not in launches:
            return units, launches[0], launches[1]
        need = max(shared_elements(backward, G, H, units, 1) for backward in (False, True)) * itemsize
        why = (f"W_hh's slice and one batch tile need {need} bytes of shared memory per block "
               f"({ceil_div(H, units)} blocks of {units} units), more than the device's {device.shared_per_block}")
    return why


def layout_launch(B, H, G, itemsize, device, units, backward):
    """The Launch of one direction with `units` per block and as many batch tiles as fit, or None."""
    def shared(tiles, threads=0, splits=1):
        return shared_elements(backward, G, H, units, tiles, threads, splits)
    groups = ceil_div(units, 4 if backward else units_per_group(G, False))
    return fitted_launch(B, ceil_div(H, units), groups, G * H if backward else H, itemsize, device, shared)


def fitted_launch(B, blocks, groups, K, itemsize, device, shared):
    """The Launch with as many batch tiles as fit in shared memory (shared(tiles, threads, splits): elements), or
    None. Warps: one per item (tile x lane group) up to the block's limit; with fewer items than that, each dot
    product (of length K) is split over `splits` warps, as long as each lane keeps MIN_K_PER_LANE products."""
    fits = [t for t in range(ceil_div(B, BT), 0, -1) if shared(t) * itemsize <= device.shared_per_block]
    if not fits:
        return None
    tiles = fits[0]
    items = tiles * groups
    max_warps = min(device.max_threads, MAX_THREADS) // WARP
    splits = max(1, min(max_warps // items, ceil_div(K, WARP * MIN_K_PER_LANE) if MIN_K_PER_LANE else max_warps))
    warps = items * splits if splits > 1 else min(items, max_warps)
    if shared(tiles, warps * WARP, splits) * itemsize > device.shared_per_block:
        splits, warps = 1, min(items, max_warps)
    return Launch(blocks, warps * WARP, shared(tiles, warps * WARP, splits) * itemsize, tiles, splits)


def phase_seconds(B, K, R, groups, itemsize, device, launch):
    """Estimated time of one matvec phase of one step: dot products of length K, lane groups of R rows."""
    passes = ceil_div(ceil_div(B, BT), launch.tiles)
    warps = launch.threads // WARP
    items_per_warp = ceil_div(launch.tiles * groups * launch.splits, warps)
    # a warp's FMA instruction takes 1 issue slot, or longer where the SM has fewer FMA lanes per scheduler
    clocks_per_fma = max(HOT_LOOP_INSTR_PER_FMA, WARP * SCHEDULERS_PER_SM / device.fma_per_sm_clock[itemsize])
    fma_clocks = ceil_div(K, WARP * launch.splits) * R * BT * clocks_per_fma
    item_clocks = fma_clocks + ITEM_OVERHEAD_CLOCKS + (SPLIT_OVERHEAD_CLOCKS if launch.splits > 1 else 0)
    warp_clocks = items_per_warp * item_clocks * max(1, warps / SCHEDULERS_PER_SM)
    stage_clocks = launch.tiles * BT * K * itemsize / L2_BYTES_PER_SM_CLOCK
    return passes * (warp_clocks + stage_clocks) / device.clock_hz


def persistent_step_seconds(B, H, G, itemsize, device, units, launch, backward):
    """Estimated time of one step of a persistent sweep in one direction."""
    groups = ceil_div(units, 4 if backward else units_per_group(G, False))
    K = G * H if backward else H
    return GRID_BARRIER_S + phase_seconds(B, K, rows_per_group(G, backward), groups, itemsize, device, launch)


def gemm_seconds(rows, K, N, itemsize, device):
    """Estimated device time of a (rows, K) x (K, N) product: the weights streamed from memory, or the FLOPs."""
    return max(K * N * itemsize / device.memory_bytes_per_s,
               rows * K * N / (device.sms * device.fma_per_sm_clock[itemsize] * device.clock_hz)) / GEMM_EFFICIENCY


def step_step_seconds(B, H, G, itemsize, device):
    """Estimated time of one step of the per-step sweep in one direction (host launches overlap the device)."""
    return max(HOST_LAUNCHES_PER_STEP * HOST_LAUNCH_S, gemm_seconds(B, H, G * H, itemsize, device) + POINTWISE_KERNEL_S)


def choose(sweep, layout, device, t_persistent, t_step):
    """The Plan: `layout` (a Plan, or a string saying why there is none) against the per-step sweep."""
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(map(repr, SWEEPS))}; got {sweep!r}")
    if sweep == "step":
        return Plan("step", reason="sweep='step' requested")
    if isinstance(layout, str):
        if sweep == "persistent":
            raise ValueError(f"sweep='persistent' cannot run on {device.name}: {layout}; use sweep='step' or 'auto'")
        return Plan("step", reason=layout)
    if sweep == "persistent":
        return dataclasses.replace(layout, reason="sweep='persistent' requested")
    why = f"estimated {t_persistent() * 1e6:.1f} us per step persistent, {t_step() * 1e6:.1f} us per-step"
    return dataclasses.replace(layout, reason=why) if t_persistent() <= t_step() else Plan("step", reason=why)


def plan(sweep, B, H, G, itemsize, device, variants=()):
    """The Plan for a sweep of batch B, hidden size H, G gates, `itemsize`-byte floats on `device`.

    sweep: "auto" (the cost model decides), "persistent" (ValueError when W_hh does not fit on chip) or "step".
    variants: names of the sweep's variants ("ln", "zoneout", "w_hr"), which only the per-step sweep runs: "auto"
    takes it, "persistent" is a ValueError naming them."""
    if variants and sweep in SWEEPS and sweep != "step":
        lacking = ", ".join(variants)
        if sweep == "persistent":
            raise ValueError(f"sweep='persistent' does not implement {lacking}; use sweep='step' or 'auto'")
        return Plan("step", reason=f"the persistent sweep does not implement {lacking}")
    layout = persistent_layout(B, H, G, itemsize, device) if sweep in ("auto", "persistent") else ""
    if not isinstance(layout, str):
        layout = Plan("persistent", *layout)

    def t_persistent():
        return sum(persistent_step_seconds(B, H, G, itemsize, device, layout.units, launch, backward)
                   for launch, backward in ((layout.forward, False), (layout.backward, True)))
    return choose(sweep, layout, device, t_persistent, lambda: 2 * step_step_seconds(B, H, G, itemsize, device))


def jordan_shared_elements(H, O, units, out_units, tiles, threads=0, splits=1):
    """Elements of dynamic shared memory of a persistent Jordan kernel (numba_persistent.build_jordan)."""
    slices = ceil_div(units, 4) * 4 * O + ceil_div(out_units, 4) * 4 * H
    return slices + tiles * BT * max(H, O) + (threads if splits > 1 else 0)


def jordan_plan(sweep, B, H, O, itemsize, device):
    """The Plan of a Jordan sweep (hidden size H, output size O); Plan.units: hidden units per block,
    Plan.out_units: outputs per block. The forward and backward kernels have the same layout and Launch."""
    layout = "the device has no cooperative launch" if not device.cooperative else ""
    if device.cooperative and sweep in ("auto", "persistent"):
        units, out_units = (ceil_div(ceil_div(n, device.sms), UNIT_QUANTUM) * UNIT_QUANTUM for n in (H, O))
        launch = fitted_launch(B, max(ceil_div(H, units), ceil_div(O, out_units)),
                               max(ceil_div(units, 4), ceil_div(out_units, 4)), min(H, O), itemsize, device,
                               lambda *a: jordan_shared_elements(H, O, units, out_units, *a))
        layout = (Plan("persistent", units, launch, launch, out_units=out_units) if launch else
                  f"W_yh's and W_hy's slices and one batch tile need "
                  f"{jordan_shared_elements(H, O, units, out_units, 1) * itemsize} bytes of shared memory per "
                  f"block, more than the device's {device.shared_per_block}")

    def t_persistent():   # two phases, two grid barriers per step, in each direction
        phases = (phase_seconds(B, O, 4, ceil_div(units, 4), itemsize, device, launch) +
                  phase_seconds(B, H, 4, ceil_div(out_units, 4), itemsize, device, launch))
        return 2 * (2 * GRID_BARRIER_S + phases)

    def t_step():         # per step: 2 GEMMs and 2 pointwise kernels, in each direction
        gemms = gemm_seconds(B, O, H, itemsize, device) + gemm_seconds(B, H, O, itemsize, device)
        return 2 * max(2 * HOST_LAUNCHES_PER_STEP * HOST_LAUNCH_S, gemms + 2 * POINTWISE_KERNEL_S)
    return choose(sweep, layout, device, t_persistent, t_step)
