"""What the compiler made of the numba backend's kernels (sm_80, sm_90): no spills, registers for the blocks the
plans launch, and persistent hot loops of at most 3 SASS instructions per FMA (float32)."""
import pytest

from gpurnn.kernels.numba_persistent import MAX_THREADS, MIN_BLOCKS
from kernel_report import TARGETS, kernel_report
from test_numba_ptx import KERNELS, PERSISTENT

REGISTERS_PER_SM = 65536          # sm_80 and sm_90
STEP_THREADS = 256                # numba_cuda.THREADS: the per-step kernels' block size on a GPU
MAX_INSTRUCTIONS_PER_FFMA = 3.0


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", KERNELS)
def test_no_spills_and_registers_for_the_blocks_launched(target, dtype, name):
    """Per-step kernels: 2 blocks of 256 threads per SM. Persistent kernels: the one block per SM the plan
    launches (numba_plan.py says why no more), and 2 blocks on sm_90 in float32 all the same."""
    row = kernel_report()[target, dtype, name]
    assert row["spill_bytes"] == 0 and row["stack_bytes"] == 0, row
    persistent = name in PERSISTENT
    blocks = 2 if not persistent or (target, dtype) == ("sm_90", "float32") else MIN_BLOCKS
    threads = MAX_THREADS if persistent else STEP_THREADS
    assert row["registers"] * threads * blocks <= REGISTERS_PER_SM, row


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", PERSISTENT)
def test_persistent_hot_loop(target, dtype, name):
    row = kernel_report()[target, dtype, name]
    assert row["shared_bytes"] == 0, "all shared memory is dynamic, as the planner counts it"
    loop = row["hot_loop"]
    # the dot product's body: R rows x 4 batch rows, R = 3 (GRU forward) or 4
    assert loop is not None and loop["fmas"] >= 12, f"no dot-product loop found: {row}"
    if dtype == "float32":
        assert loop["instructions"] / loop["fmas"] <= MAX_INSTRUCTIONS_PER_FFMA, row


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDS.128 R8, [R4] ;
        /*0020*/                   FFMA R2, R8, R9, R2 ;
        /*0030*/                   FFMA R3, R8, R10, R3 ;
        /*0040*/                   IADD3 R4, R4, 0x10, RZ ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0060*/                   FFMA R2, R8, R9, R2 ;
        /*0070*/               @P1 BRA `(.L_x_3) ;
        /*0080*/                   FFMA R2, R8, R9, R2 ;
        /*0090*/                   FFMA R2, R8, R9, R2 ;
        /*00a0*/                   FFMA R2, R8, R9, R2 ;
.L_x_3:
        /*00b0*/               @P2 BRA `(.L_x_2) ;
        /*00c0*/                   EXIT ;
"""


def test_hot_loop_is_the_single_block_loop_with_most_fmas():
    from gpurnn.kernels.sass import hot_loop
    # .L_x_2 has more FFMAs but branches inside: not a single-block loop
    assert hot_loop(SASS, "FFMA") == (5, 2)
    assert hot_loop(SASS, "DFMA") is None


def test_resources_read_from_ptxas_log():
    from gpurnn.kernels.sass import resources
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
           "ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]\n")
    assert resources(log) == {"registers": 40, "spill_bytes": 16, "stack_bytes": 8, "shared_bytes": 256}
