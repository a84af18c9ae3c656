"""Persistent sweeps: all T steps of one layer and direction in one cooperative launch, built per (dtype, cell);
the Jordan network's at the end (build_jordan).

Block k of the grid owns hidden units j0 = k*units .. min(H, j0 + units) - 1 and keeps, for the whole launch, its
slice of W_hh (forward: the G*units rows of its units; backward: the `units` columns of W_hh, i.e. rows of
W_hh^T) in dynamic shared memory. Per step it stages the vector the matvec reads (forward h_t (B, H); backward
dgates_{t+1} (B, G*H)) into shared memory once, computes its units, writes them to global memory, and one
grid-wide barrier publishes them to every block.

Work inside a block: the batch is cut into tiles of BT = 4 rows; an *item* is one tile times one *lane group* of
R rows of the slice, split over `splits` warps along the dot product (K = H forward, G*H backward). Lane l of
split s takes k = 32*s + l, stepping 32*splits, and keeps R*BT partial sums in registers: per k it reads R
weights (one LDS.128 when R = 4) and BT staged values (one LDS.128) and issues R*BT FMAs, so each weight serves
BT batch rows and each staged value R rows. A warp-shuffle reduction then sums over the warp's lanes: reduce_rows
leaves every lane the R sums of batch row bb = l // 8 (LSTM and GRU forward, where one lane needs all G gates of
its unit), reduce_scatter leaves lane l the sum of row r = (l // 2) % 4, batch row bb = l // 8 (Elman forward:
4 units; backward: 4 columns). With splits > 1 the warps add their partial sums through shared memory. The
hot-loop index math is unsigned 32-bit (no wrap-around selects, 32-bit adds).

Lane groups: forward, UPT units with all their G gates (UPT = 4 for Elman, 1 for LSTM and GRU, so R = 4, 4, 3);
backward, 4 columns of W_hh (R = 4 for every cell).
Shared memory, in elements (numba_plan.shared_elements): forward [W: ceil(units/UPT)*H*R rounded up to 4]
[h: tiles*BT*H][partials: threads*R_out]; backward [W^T: ceil(units/4)*4*G*H][dgates: tiles*BT*G*H]
[partials: threads]; partials only when splits > 1; R_out = R for reduce_rows, 1 for reduce_scatter.
Arguments `units`, `tiles` (batch tiles staged per pass: all of them when they fit, one pass per step) and
`splits` come from the launch plan (numba_plan.py); threads = 32 * warps with warps a multiple of splits.
"""
import functools
from types import SimpleNamespace

import numpy as np
from numba import cuda, from_dtype, uint32

from .numba_cuda_kernels import ELMAN, GRU, LSTM, build as build_cells

BT = 4                    # batch rows per tile
WARP = 32                 # lanes of a warp
FULL_MASK = 0xFFFFFFFF    # every lane takes part in each shuffle
GATE_COUNT = {ELMAN: 1, LSTM: 4, GRU: 3}
# Launch bounds (MAX_THREADS, MIN_BLOCKS): blocks of up to 256 threads, registers capped only so that one such block
# fits an SM. The plan runs one block per SM (numba_plan.py says why); a cap for 2 blocks (128 registers) would make
# sm_80 spill: its ptxas takes 160-200 registers for the float32 kernels where sm_90's takes 90-115.
MAX_THREADS = 256
MIN_BLOCKS = 1


def simulator():
    return bool(cuda.config.ENABLE_CUDASIM)


def checked_u32(x):
    """The simulator's uint32 cast: a Python int (fast), and an error where the GPU would wrap around."""
    x = int(x)
    if not 0 <= x < 1 << 32:
        raise OverflowError(f"unsigned 32-bit index out of range: {x}")
    return x


U32 = checked_u32 if simulator() else uint32
# Unsigned constants for index math: Numba types uint32 op uint32 as uint64 and int64 op uint64 as float64, so every
# integer that meets an index is unsigned (U32(x) on each result keeps the arithmetic 32 bits wide).
BT_, WARP_, FOUR = U32(BT), U32(WARP), U32(4)


def jit_options(itemsize=None):
    """Options for cuda.jit on a GPU (the simulator takes neither): device functions (itemsize None) inlined
    into the kernel, so their register arrays stay registers; kernels with launch bounds. No bounds checks:
    Numba's default for CUDA (numba-cuda 0.30 rejects boundscheck=False on a kernel, so it is not passed)."""
    if simulator():
        return {"device": itemsize is None}
    if itemsize is None:
        return {"device": True, "forceinline": True}
    return {"launch_bounds": (MAX_THREADS, MIN_BLOCKS)}


def units_per_group(G, backward):
    """Hidden units one lane group serves: forward UPT (4 Elman units, 1 LSTM/GRU unit), backward 4 columns."""
    return 4 if backward or G == 1 else 1


def rows_per_group(G, backward):
    return 4 if backward else G * units_per_group(G, False)


def sums_per_lane(G, backward):
    """Sums a lane holds after the warp reduction: R (reduce_rows) or 1 (reduce_scatter)."""
    return 1 if backward or G == 1 else G


@functools.lru_cache(maxsize=None)
def tile_ops(dtype, R):
    """Device functions for lane groups of R rows in dtype `dtype`."""
    F = np.dtype(dtype).type
    NF = from_dtype(np.dtype(dtype))
    RB, R2 = R * BT, 2 * R       # local array sizes must be compile-time constants
    R_ = U32(R)

    @cuda.jit(**jit_options())
    def dot_tile(sm, wq, xq, K, k, step, acc):
        """acc[r*BT + bb] = sum over k, k + step, ... < K of sm[R*(wq + k) + r] * sm[BT*(xq + k) + bb]; the loop
        carries the two indices itself (two 32-bit adds per step).

        sm: the block's shared memory; wq, xq: offsets (in R and BT elements) of this lane group's weights and
        of this tile's staged vector; acc: (R*BT,) registers."""
        for e in range(RB):
            acc[e] = F(0)
        w, dw, end = U32(R_ * (wq + k)), U32(R_ * step), U32(R_ * (wq + K))   # w < end: k < K
        x, dx = U32(BT_ * (xq + k)), U32(BT_ * step)
        while w < end:
            for r in range(R):
                wv = sm[w + r]
                for bb in range(BT):
                    acc[r * BT + bb] += wv * sm[x + bb]
            w, x = U32(w + dw), U32(x + dx)

    @cuda.jit(**jit_options())
    def halve_batch(acc, lane, half):
        """half[2r + i] = acc[r*BT + bb] summed over lanes l, l ^ 16, with bb = 2*((l >> 4) & 1) + i."""
        hi = (lane >> 4) & 1
        # values first, then selects: a select between two array elements would index the array at run time
        for r in range(R):
            for i in range(2):
                low, high = acc[r * BT + i], acc[r * BT + 2 + i]
                keep, send = (high, low) if hi else (low, high)
                half[2 * r + i] = keep + cuda.shfl_xor_sync(FULL_MASK, send, 16)

    @cuda.jit(**jit_options())
    def reduce_rows(acc, lane, sums):
        """sums[r] = the warp-wide sum of acc[r*BT + bb] for bb = lane // 8, every r: 6R shuffles.

        Lanes 16 apart swap halves of the tile (bit 4 of the lane keeps bb // 2), lanes 8 apart the other half
        (bit 3 keeps bb % 2), then lanes 4, 2, 1 apart add whole."""
        half = cuda.local.array(R2, NF)
        halve_batch(acc, lane, half)
        lo = (lane >> 3) & 1
        for r in range(R):
            low, high = half[2 * r], half[2 * r + 1]
            keep, send = (high, low) if lo else (low, high)
            s = keep + cuda.shfl_xor_sync(FULL_MASK, send, 8)
            s += cuda.shfl_xor_sync(FULL_MASK, s, 4)
            s += cuda.shfl_xor_sync(FULL_MASK, s, 2)
            s += cuda.shfl_xor_sync(FULL_MASK, s, 1)
            sums[r] = s

    @cuda.jit(**jit_options())
    def reduce_scatter(acc, lane, sums):
        """sums[0] = the warp-wide sum of acc[r*BT + bb] for bb = lane // 8, r = (lane // 2) % 4 (R = 4): 16
        shuffles. As reduce_rows for the batch, then lanes 4 and 2 apart split the rows (bits 2 and 1 of the
        lane), lanes 1 apart add the value left."""
        half = cuda.local.array(R2, NF)
        halve_batch(acc, lane, half)
        lo = (lane >> 3) & 1
        quarter = cuda.local.array(R, NF)                   # quarter[r]: this lane's bb
        for r in range(R):
            low, high = half[2 * r], half[2 * r + 1]
            keep, send = (high, low) if lo else (low, high)
            quarter[r] = keep + cuda.shfl_xor_sync(FULL_MASK, send, 8)
        r1 = (lane >> 2) & 1
        pair = cuda.local.array(2, NF)                      # pair[i]: row 2*r1 + i
        for i in range(2):
            low, high = quarter[i], quarter[2 + i]
            keep, send = (high, low) if r1 else (low, high)
            pair[i] = keep + cuda.shfl_xor_sync(FULL_MASK, send, 4)
        r0 = (lane >> 1) & 1
        keep, send = (pair[1], pair[0]) if r0 else (pair[0], pair[1])
        v = keep + cuda.shfl_xor_sync(FULL_MASK, send, 2)
        sums[0] = v + cuda.shfl_xor_sync(FULL_MASK, v, 1)

    return SimpleNamespace(dot_tile=dot_tile, reduce_rows=reduce_rows, reduce_scatter=reduce_scatter, local_type=NF)


@functools.lru_cache(maxsize=None)
def block_ops(dtype):
    """Device functions every persistent kernel of dtype `dtype` uses."""
    F = np.dtype(dtype).type

    @cuda.jit(**jit_options())
    def thread_place():
        """(thread, lane, warp, warps, threads) of this thread in its block."""
        tid, threads = U32(cuda.threadIdx.x), U32(cuda.blockDim.x)
        return tid, U32(tid % WARP_), U32(tid // WARP_), U32(threads // WARP_), threads

    @cuda.jit(**jit_options())
    def share(units, H, per_group):
        """(first unit, units, lane groups, units padded to whole groups) of this block: it owns units first ..
        first + units - 1 of H, `units` per block (the last blocks fewer, or none); W slices are padded with 0."""
        first = U32(U32(cuda.blockIdx.x) * units)
        count = U32(min(units, U32(H - first))) if first < H else U32(0)
        return (first, count, U32((count + per_group - 1) // per_group),
                U32((units + per_group - 1) // per_group * per_group))

    @cuda.jit(**jit_options())
    def load_rows(sm, offset, w, first, count, padded, K, tid, threads):
        """Rows first .. first+padded-1 of w (n, K), 0 from row first+count on, in lane groups of 4 rows:
        sm[offset + 4*((r // 4)*K + k) + r % 4] = w[first + r, k]. Read along k (coalesced)."""
        e = tid
        while e < padded * K:
            r = U32(e // K)
            k = U32(e - r * K)
            v = w[first + r, k] if r < count else F(0)
            sm[U32(offset + FOUR * (r // FOUR * K + k) + r % FOUR)] = v
            e = U32(e + threads)

    @cuda.jit(**jit_options())
    def load_columns(sm, offset, w, first, count, padded, K, tid, threads):
        """Columns first .. first+padded-1 of w (K, n) as rows of w^T, 0 from column first+count on, in lane
        groups of 4: sm[offset + 4*((c // 4)*K + k) + c % 4] = w[k, first + c]. Read along the rows of w."""
        e = tid
        while e < K * padded:
            k = U32(e // padded)
            c = U32(e - k * padded)
            v = w[k, first + c] if c < count else F(0)
            sm[U32(offset + FOUR * (c // FOUR * K + k) + c % FOUR)] = v
            e = U32(e + threads)

    @cuda.jit(**jit_options())
    def item_at(base, warp, S, groups, count):
        """(item, active, split, tile, group) of this warp in the round starting at item `base`, of `count`:
        item = (tile*groups + group)*S + split."""
        item = U32(base + warp)
        tile = U32(item // S // groups)
        return item, item < count, U32(item % S), tile, U32(item // S - tile * groups)

    @cuda.jit(**jit_options())
    def stage(sm, src, plane, B, K, row0, rows, xq0, tid, threads):
        """Batch rows row0 .. row0+rows-1 of src[plane] (B, K) into shared memory, 0 past B, tile by tile:
        sm[BT*(xq0 + (r // BT)*K + k) + r % BT] = src[plane, row0 + r, k]. Read along k (coalesced)."""
        e = tid
        while e < rows * K:
            r = U32(e // K)
            k = U32(e - r * K)
            b = U32(row0 + r)
            v = src[plane, b, k] if b < B else F(0)
            sm[U32(BT_ * (xq0 + r // BT_ * K + k) + r % BT_)] = v
            e = U32(e + threads)

    @cuda.jit(**jit_options())
    def begin_pass(sm, src, plane, B, K, tile0, tiles, ntiles, xq0, tid, threads, synced, staged):
        """Start a pass over batch tiles tile0 .. tile0 + nt - 1 and return nt: a block barrier unless `synced`
        (a grid barrier already separates this pass from the last reads of shared memory), then, if `staged`,
        src[plane] (B, K) of those rows into shared memory (stage) and a block barrier."""
        nt = U32(min(tiles, U32(ntiles - tile0)))
        if not synced:
            cuda.syncthreads()
        if staged:
            stage(sm, src, plane, B, K, U32(tile0 * BT_), U32(nt * BT_), xq0, tid, threads)
            cuda.syncthreads()
        return nt

    return SimpleNamespace(thread_place=thread_place, share=share, load_rows=load_rows, load_columns=load_columns,
                           item_at=item_at, begin_pass=begin_pass)


@functools.lru_cache(maxsize=None)
def item_ops(dtype, R, gates):
    """item_sums for lane groups of R rows: `gates` leaves every lane the R sums of its batch row (reduce_rows),
    else one sum per lane (reduce_scatter); n: sums per lane."""
    F = np.dtype(dtype).type
    tiles = tile_ops(dtype, R)
    dot, reduce = tiles.dot_tile, (tiles.reduce_rows if gates else tiles.reduce_scatter)
    n = R if gates else 1
    n_ = U32(n)

    @cuda.jit(**jit_options())
    def item_sums(sm, compute, split, S, wq, xq, K, lane, warp, red, acc, sums):
        """sums (n,): this lane's sums of the item whose weights start at R*wq and staged tile at BT*xq, over
        all K when it is the item's first split (split 0); 0 when not `compute`. With S > 1 splits the warps of
        an item (consecutive warps) add their partial sums through shared memory at `red`: every warp of the
        block must then call this together, as it holds block barriers."""
        for r in range(n):
            sums[r] = F(0)
        if compute:
            dot(sm, wq, xq, K, U32(split * WARP_ + lane), U32(S * WARP_), acc)
            reduce(acc, lane, sums)
        if S > 1:
            if compute:
                for r in range(n):
                    sm[U32(red + (warp * n_ + r) * WARP_ + lane)] = sums[r]
            cuda.syncthreads()
            if compute and split == 0:
                for s in range(1, S):
                    for r in range(n):
                        sums[r] += sm[U32(red + ((warp + s) * n_ + r) * WARP_ + lane)]

    return SimpleNamespace(item_sums=item_sums, n=n, acc_size=R * BT, local_type=tiles.local_type)


@functools.lru_cache(maxsize=None)
def build(dtype, cell):
    """SimpleNamespace(forward, backward): the persistent kernels of cell code `cell` (ELMAN | LSTM | GRU)."""
    F = np.dtype(dtype).type
    cells = build_cells(dtype)
    inputs, unit_forward, unit_backward = cells.inputs, cells.unit_forward, cells.unit_backward
    G = GATE_COUNT[cell]
    UPT = units_per_group(G, False)
    R = rows_per_group(G, False)
    G_, UPT_, R_ = U32(G), U32(UPT), U32(R)
    ops = block_ops(dtype)
    place, share, begin_pass, item_at = ops.thread_place, ops.share, ops.begin_pass, ops.item_at
    load_columns = ops.load_columns
    fwd, bwd = item_ops(dtype, R, UPT == 1), item_ops(dtype, 4, False)
    forward_sums, backward_sums = fwd.item_sums, bwd.item_sums
    NF, ACC_F, ACC_B, NS_F = fwd.local_type, fwd.acc_size, bwd.acc_size, fwd.n   # local array sizes: constants

    @cuda.jit(**jit_options(np.dtype(dtype).itemsize))
    def forward(act, units, tiles, splits, xw, w_hh, b_hh, b_ih, lengths, h0, hbuf, c, y, gates, cs, hns):
        """All T forward steps. act: Elman activation code; units, tiles, splits: see the module docstring.

        xw: (T, B, G*H)  w_hh: (G*H, H)  b_hh, b_ih: (G*H,)  lengths: (B,) int32  h0: (1, B, H)
        hbuf: (2, B, H) step t reads h_t (h0 at t = 0, else hbuf[t % 2]) and writes h_{t+1} to hbuf[(t+1) % 2]
        c: (B, H) LSTM state, updated in place  y: (T, B, H)  gates: (T, B, G*H)  cs, hns: (T, B, H)
        """
        T = xw.shape[0]
        B = U32(hbuf.shape[1])
        H = U32(hbuf.shape[2])
        units_, S = U32(units), U32(splits)
        tid, lane, warp, nwarps, nthreads = place()
        j0, nj, groups, padded = share(units_, H, UPT_)         # units j0 .. j0+nj-1, in groups of UPT
        xq0 = U32((padded // UPT_ * H * R_ + BT_ - 1) // BT_)   # the staged h starts at element BT*xq0
        red = U32(BT_ * (xq0 + U32(tiles) * H))                 # the partial sums of split items start here
        sm = cuda.shared.array(0, dtype=xw.dtype)
        # W slice: sm[R*(ug*H + k) + g*UPT + uu] = w_hh[g*H + j0 + ug*UPT + uu, k]; read along k (coalesced)
        e = tid
        while e < G_ * padded * H:
            gj = U32(e // H)
            k = U32(e - gj * H)
            g = U32(gj // padded)
            jj = U32(gj - g * padded)
            v = w_hh[g * H + j0 + jj, k] if jj < nj else F(0)
            sm[U32(R_ * (jj // UPT_ * H + k) + g * UPT_ + jj % UPT_)] = v
            e = U32(e + nthreads)
        ntiles = U32((B + BT_ - 1) // BT_)
        acc = cuda.local.array(ACC_F, NF)
        sums = cuda.local.array(NS_F, NF)
        grid = cuda.cg.this_grid()
        for t in range(T):
            for tile0 in range(0, ntiles, tiles):
                nt = begin_pass(sm, h0 if t == 0 else hbuf, 0 if t == 0 else t % 2, B, H, tile0, U32(tiles), ntiles,
                                xq0, tid, nthreads, t > 0 and tile0 == 0, True)
                for base in range(0, nt * groups * S, nwarps):  # rounds: every warp runs each one
                    item, active, split, ts, ug = item_at(base, warp, S, groups, nt * groups * S)
                    xq = U32(xq0 + ts * H)
                    # LSTM, GRU: lane 8*bb gets the G gates of unit ug; Elman: lane 8*bb + 2*uu unit 4*ug + uu
                    uu = U32(0 if UPT == 1 else lane // 2 % 4)
                    bb = U32(lane // 8)
                    b = U32((tile0 + ts) * BT_ + bb)
                    j = U32(j0 + ug * UPT_ + uu)
                    writes = (active and split == 0 and lane % (8 if UPT == 1 else 2) == 0 and j < j0 + nj
                              and b < B)
                    x0 = x1 = x2 = x3 = F(0)
                    if writes:                                  # loaded before the dot product, used after it
                        x0, x1, x2, x3 = inputs(xw, b_ih, t, b, j, G)
                    forward_sums(sm, active, split, S, U32(ug * H), xq, H, lane, warp, red, acc, sums)
                    if writes:
                        r1 = sums[1] if G > 1 else F(0)
                        r2 = sums[2] if G > 2 else F(0)
                        r3 = sums[3] if G > 3 else F(0)
                        h_prev = sm[U32(BT_ * (xq + j) + bb)]
                        hbuf[1 - t % 2, b, j] = unit_forward(cell, act, t, b, j, t < lengths[b], x0, x1, x2, x3,
                                                             b_hh, sums[0], r1, r2, r3, h_prev, c, y, gates, cs,
                                                             hns)
                    if S > 1:
                        cuda.syncthreads()                      # the partials are rewritten next round
            if t + 1 < T:
                grid.sync()

    @cuda.jit(**jit_options(np.dtype(dtype).itemsize))
    def backward(act, units, tiles, splits, w_hh, lengths, dh, dy, y, h0, gates, cs, c0, hns, dc, dgx, dgh):
        """All T backward steps, then dL/dh0. dh: (B, H) dL/dh_n on entry, dL/dh0 on exit.

        dL/dh_t[b, k] = carried[b, k] + sum_gj dgh[t+1, b, gj] W_hh[gj, k]: block k keeps columns k0 .. of W_hh
        (rows of W_hh^T); step t = -1 only adds dgh[0] @ W_hh. w_hh: (G*H, H)  lengths: (B,) int32
        dy, y: (T, B, H)  h0, c0: (B, H)  gates, dgx, dgh: (T, B, G*H)  cs, hns: (T, B, H)  dc: (B, H) LSTM
        dL/dc, in place. Padded steps write 0 to dgx, dgh; for Elman and LSTM dgh is dgx.
        """
        T = dy.shape[0]
        B = U32(dh.shape[0])
        H = U32(dh.shape[1])
        GH = U32(w_hh.shape[0])
        units_, S = U32(units), U32(splits)
        tid, lane, warp, nwarps, nthreads = place()
        k0, nk, groups, padded = share(units_, H, FOUR)         # columns k0 .. k0+nk-1, in groups of 4
        xq0 = U32(padded // FOUR * GH)                          # the staged dgates start at element BT*xq0
        red = U32(BT_ * (xq0 + U32(tiles) * GH))                # the partial sums of split items start here
        sm = cuda.shared.array(0, dtype=dy.dtype)
        load_columns(sm, U32(0), w_hh, k0, nk, padded, GH, tid, nthreads)   # sm[4*(cg*GH + gj) + r]: W_hh^T
        ntiles = U32((B + BT_ - 1) // BT_)
        acc = cuda.local.array(ACC_B, NF)
        sums = cuda.local.array(1, NF)
        grid = cuda.cg.this_grid()
        for step in range(T + 1):
            t = T - 1 - step
            for tile0 in range(0, ntiles, tiles):
                nt = begin_pass(sm, dgh, t + 1, B, GH, tile0, U32(tiles), ntiles, xq0, tid, nthreads,
                                step > 0 and tile0 == 0, t + 1 < T)
                for base in range(0, nt * groups * S, nwarps):
                    item, active, split, ts, cg = item_at(base, warp, S, groups, nt * groups * S)
                    backward_sums(sm, active and t + 1 < T, split, S, U32(cg * GH), U32(xq0 + ts * GH), GH, lane,
                                  warp, red, acc, sums)
                    # lane 8*bb + 2*r: column 4*cg + r, batch row bb
                    b = U32((tile0 + ts) * BT_ + lane // 8)
                    col = U32(cg * FOUR + lane // 2 % 4)
                    if active and split == 0 and lane % 2 == 0 and col < nk and b < B:
                        j = U32(k0 + col)
                        dh_in = dh[b, j] + sums[0]
                        if t >= 0:
                            dh_in = unit_backward(cell, act, t, b, j, t < lengths[b], dh_in, dy, y, h0, gates, cs,
                                                  c0, hns, dc, dgx, dgh)
                        dh[b, j] = dh_in
                    if S > 1:
                        cuda.syncthreads()
            if t >= 0:
                grid.sync()

    return SimpleNamespace(forward=forward, backward=backward)


@functools.lru_cache(maxsize=None)
def build_jordan(dtype):
    """SimpleNamespace(forward, backward): the persistent Jordan kernels. Each step is two matvec phases with a
    grid barrier after each: hidden units (K = O) then outputs (K = H); block k owns hidden units j0 = k*units ..
    and outputs o0 = k*out_units .., in lane groups of 4 rows as the Elman forward (reduce_scatter). Shared memory
    (elements): [A slice: ceil(units/4)*4*O or ceil(out_units/4)*4*H][B slice][staged: tiles*BT*max(H, O)]
    [partials: threads, when splits > 1]; act, out_act: activation codes of h and y."""
    F = np.dtype(dtype).type
    cells = build_cells(dtype)
    activate, activate_backward = cells.activate, cells.activate_backward
    ops = block_ops(dtype)
    place, share, begin_pass, item_at = ops.thread_place, ops.share, ops.begin_pass, ops.item_at
    load_rows, load_columns = ops.load_rows, ops.load_columns
    scatter = item_ops(dtype, 4, False)
    sums_of, NF, ACC = scatter.item_sums, scatter.local_type, scatter.acc_size

    @cuda.jit(**jit_options())
    def layout(units, out_units, H, O, tiles):
        """This block's hidden units (j0, nj, groups, padded), outputs (o0, no, groups, padded), and where the
        staged vector (BT*xq0) and the partial sums (red) start: after the two slices, hpad*O + opad*H elements."""
        j0, nj, hgroups, hpad = share(units, H, FOUR)
        o0, no, ogroups, opad = share(out_units, O, FOUR)
        xq0 = U32((hpad * O + opad * H) // BT_)
        red = U32(BT_ * (xq0 + tiles * max(H, O)))
        return j0, nj, hgroups, hpad, o0, no, ogroups, opad, xq0, red

    @cuda.jit(**jit_options(np.dtype(dtype).itemsize))
    def forward(act, out_act, units, out_units, tiles, splits, xw, w_yh, w_hy, b_y, lengths, y0, ybuf, h, y):
        """All T steps: h_t = act(xw_t + y_{t-1} W_yh^T), y_t = out_act(h_t W_hy^T + b_y).

        xw: (T, B, H)  w_yh: (H, O)  w_hy: (O, H)  b_y: (O,)  lengths: (B,) int32  y0: (1, B, O)
        ybuf: (2, B, O) the state (y of the last valid step): step t reads y0 (t = 0) or ybuf[t % 2] and writes
        ybuf[(t+1) % 2]  h: (T, B, H), y: (T, B, O), 0 at padded steps
        """
        T = xw.shape[0]
        B = U32(y.shape[1])
        H = U32(xw.shape[2])
        O = U32(y.shape[2])
        S = U32(splits)
        tid, lane, warp, nwarps, nthreads = place()
        j0, nj, hgroups, hpad, o0, no, ogroups, opad, xq0, red = layout(U32(units), U32(out_units), H, O,
                                                                        U32(tiles))
        second = U32(hpad * O)
        sm = cuda.shared.array(0, dtype=xw.dtype)
        load_rows(sm, U32(0), w_yh, j0, nj, hpad, O, tid, nthreads)      # W_yh rows: sm[4*(g*O + o) + r]
        load_rows(sm, second, w_hy, o0, no, opad, H, tid, nthreads)      # W_hy rows: sm[second + 4*(g*H + j) + r]
        ntiles = U32((B + BT_ - 1) // BT_)
        acc = cuda.local.array(ACC, NF)
        sums = cuda.local.array(1, NF)
        grid = cuda.cg.this_grid()
        r = U32(lane // 2 % 4)                                  # lane 8*bb + 2*r: row 4*group + r, batch row bb
        for t in range(T):
            for tile0 in range(0, ntiles, tiles):               # h_t = act(xw_t + state W_yh^T): K = O
                nt = begin_pass(sm, y0 if t == 0 else ybuf, 0 if t == 0 else t % 2, B, O, tile0, U32(tiles), ntiles,
                                xq0, tid, nthreads, t > 0 and tile0 == 0, True)
                for base in range(0, nt * hgroups * S, nwarps):
                    item, active, split, ts, g = item_at(base, warp, S, hgroups, nt * hgroups * S)
                    b = U32((tile0 + ts) * BT_ + lane // 8)
                    j = U32(j0 + g * FOUR + r)
                    writes = active and split == 0 and lane % 2 == 0 and j < j0 + nj and b < B
                    x = xw[t, b, j] if writes else F(0)
                    sums_of(sm, active, split, S, U32(g * O), U32(xq0 + ts * O), O, lane, warp, red, acc, sums)
                    if writes:
                        h[t, b, j] = activate(act, x + sums[0]) if t < lengths[b] else F(0)
                    if S > 1:
                        cuda.syncthreads()
            grid.sync()
            for tile0 in range(0, ntiles, tiles):               # y_t = out_act(h_t W_hy^T + b_y): K = H
                nt = begin_pass(sm, h, t, B, H, tile0, U32(tiles), ntiles, xq0, tid, nthreads, tile0 == 0, True)
                for base in range(0, nt * ogroups * S, nwarps):
                    item, active, split, ts, g = item_at(base, warp, S, ogroups, nt * ogroups * S)
                    b = U32((tile0 + ts) * BT_ + lane // 8)
                    o = U32(o0 + g * FOUR + r)
                    writes = active and split == 0 and lane % 2 == 0 and o < o0 + no and b < B
                    sums_of(sm, active, split, S, U32(second // FOUR + g * H), U32(xq0 + ts * H), H, lane, warp,
                            red, acc, sums)
                    if writes:
                        v = activate(out_act, sums[0] + b_y[o])
                        valid = t < lengths[b]
                        y[t, b, o] = v if valid else F(0)
                        ybuf[1 - t % 2, b, o] = v if valid else (y0[0, b, o] if t == 0 else ybuf[t % 2, b, o])
                    if S > 1:
                        cuda.syncthreads()
            if t + 1 < T:
                grid.sync()

    @cuda.jit(**jit_options(np.dtype(dtype).itemsize))
    def backward(act, out_act, units, out_units, tiles, splits, w_yh, w_hy, lengths, dy, y, h, carry, dph, dpy):
        """All T backward steps, t = T-1 .. 0, then dL/dy0.

        Per step: outputs (K = H): s = carry + dph[t+1] @ W_yh; at a valid step dpy[t] = (s + dy[t]) out_act'(y[t])
        and carry = 0, else carry = s (y_t feeds the loss and the next step); hidden units (K = O): dph[t] =
        (dpy[t] @ W_hy) act'(h[t]). Step t = -1 only adds dph[0] @ W_yh to carry, which is then dL/dy0.
        w_yh: (H, O)  w_hy: (O, H)  lengths: (B,) int32  dy, y, dpy: (T, B, O)  h, dph: (T, B, H)
        carry: (B, O) dL/dy_n on entry, dL/dy0 on exit. dph and dpy arrive zeroed.
        """
        T = dy.shape[0]
        B = U32(dy.shape[1])
        O = U32(dy.shape[2])
        H = U32(h.shape[2])
        S = U32(splits)
        tid, lane, warp, nwarps, nthreads = place()
        j0, nj, hgroups, hpad, o0, no, ogroups, opad, xq0, red = layout(U32(units), U32(out_units), H, O,
                                                                        U32(tiles))
        second = U32(opad * H)
        sm = cuda.shared.array(0, dtype=dy.dtype)
        load_columns(sm, U32(0), w_yh, o0, no, opad, H, tid, nthreads)   # W_yh^T rows: sm[4*(g*H + j) + r]
        load_columns(sm, second, w_hy, j0, nj, hpad, O, tid, nthreads)  # W_hy^T rows: sm[second + 4*(g*O + o) + r]
        ntiles = U32((B + BT_ - 1) // BT_)
        acc = cuda.local.array(ACC, NF)
        sums = cuda.local.array(1, NF)
        grid = cuda.cg.this_grid()
        r = U32(lane // 2 % 4)
        for step in range(T + 1):
            t = T - 1 - step
            for tile0 in range(0, ntiles, tiles):               # dpy[t] from dph[t+1] @ W_yh: K = H
                nt = begin_pass(sm, dph, t + 1, B, H, tile0, U32(tiles), ntiles, xq0, tid, nthreads,
                                step > 0 and tile0 == 0, t + 1 < T)
                for base in range(0, nt * ogroups * S, nwarps):
                    item, active, split, ts, g = item_at(base, warp, S, ogroups, nt * ogroups * S)
                    b = U32((tile0 + ts) * BT_ + lane // 8)
                    o = U32(o0 + g * FOUR + r)
                    sums_of(sm, active and t + 1 < T, split, S, U32(g * H), U32(xq0 + ts * H), H, lane, warp, red,
                            acc, sums)
                    if active and split == 0 and lane % 2 == 0 and o < o0 + no and b < B:
                        s = carry[b, o] + sums[0]
                        if t >= 0 and t < lengths[b]:
                            # y = out_act(py):  dpy = (ds + dy) out_act'(py), written from y
                            dpy[t, b, o] = activate_backward(out_act, s + dy[t, b, o], y[t, b, o])
                            carry[b, o] = F(0)
                        else:
                            carry[b, o] = s
                    if S > 1:
                        cuda.syncthreads()
            if t < 0:
                return
            grid.sync()
            for tile0 in range(0, ntiles, tiles):               # dph[t] = (dpy[t] @ W_hy) act'(h[t]): K = O
                nt = begin_pass(sm, dpy, t, B, O, tile0, U32(tiles), ntiles, xq0, tid, nthreads, tile0 == 0, True)
                for base in range(0, nt * hgroups * S, nwarps):
                    item, active, split, ts, g = item_at(base, warp, S, hgroups, nt * hgroups * S)
                    b = U32((tile0 + ts) * BT_ + lane // 8)
                    j = U32(j0 + g * FOUR + r)
                    sums_of(sm, active, split, S, U32(second // FOUR + g * O), U32(xq0 + ts * O), O, lane, warp,
                            red, acc, sums)
                    if active and split == 0 and lane % 2 == 0 and j < j0 + nj and b < B:
                        # h = act(ph), ph = xw + y_prev W_yh^T:  dph = dhh act'(ph), written from h
                        dph[t, b, j] = activate_backward(act, sums[0], h[t, b, j])
                    if S > 1:
                        cuda.syncthreads()
            grid.sync()

    return SimpleNamespace(forward=forward, backward=backward)
