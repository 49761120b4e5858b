"""Triton kernels of the fused DINO loss (paper eq. 1); the launcher lives in ``dino_loss.py``.

Notation (crop-major rows, as in ``fdino.loss``): image b, student crop j in [0, V), teacher crop
i in {0, 1}; ``s_j = S[j*B + b]``, ``t_i = T[i*B + b]``, ``u_i = t_i - c``.

Per image, with ``ms_j = max(s_j)``, ``z_j = sum_k exp((s_j[k] - ms_j) / tau_s)``,
``mt_i = max(u_i)``, ``e_i = exp((u_i - mt_i) / tau_t)``, ``Z_i = sum_k e_i[k]`` and
``D_ij = sum_k e_i[k] * (s_j[k] - ms_j)``:

    sum_{i != j} H(q_i, p_j) = sum_j [ n_j * ln z_j - sum_{i != j} D_ij / (Z_i * tau_s) ]

(n_j = number of teachers paired with crop j). Every term is measured from its row's maximum, so
nothing cancels even for logits of 1e4 at tau = 0.01: the raw ``lse - <q, s>/tau`` form would lose
``eps * |s| / tau`` absolute accuracy. Exponentials are base 2 with ``log2(e) / tau`` folded into
one multiplier.

Kernels (all launch configurations are pinned by the launcher; reductions have a fixed order, no
atomics, so outputs are bitwise reproducible):
- ``_fwd_partials_kernel``, grid (n_split, B): online statistics of one K-chunk of one image.
- ``_fwd_combine_kernel``, grid (B,): merges the chunks, writes per-row statistics and the
  per-image loss.
- ``_fwd_finalize_kernel``, grid (cdiv(K, BLOCK_C),): batch center (column mean of T, rows in a
  fixed order); program 0 also sums the per-image losses in order.
- ``_bwd_kernel``, grid (cdiv(K, BLOCK_K), B): dS_j = g * (n_j p_j - Qbar_j) / (tau_s * P * B).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _interpreter_scalar_index_fix() -> None:
    """Let triton < 3.8's interpreter use a scalar kernel argument as a loop bound under NumPy >= 2.4.

    The interpreter holds a scalar argument as an ndarray of shape (1,) and its ``__index__`` (what
    ``range(0, n)`` and ``tl.range(0, n)`` call) is ``int(data)``; NumPy 2.4 turned that deprecated
    conversion into "TypeError: only 0-dimensional arrays can be converted to Python scalars", so
    every loop with a runtime bound fails there (triton-lang/triton#9171, fixed upstream by #9172,
    ``int(data.squeeze())``; triton 3.8.0 ships the fix, 3.6.0, the GPU machines' version, does not).
    Compiled kernels never run this code: triton 3.6 compiles and pipelines these loops exactly like
    3.8. Installs the upstream one-line fix into the per-launch patch of ``tl.tensor``.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 8):
        return
    from triton.runtime import interpreter  # noqa: PLC0415  (only when interpreting on triton < 3.8)

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_fix(tensor, scope):
        patch_tensor(tensor, scope)
        # Recorded in the same scope, so the launch's restore() undoes it with the rest.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    if getattr(patch_tensor, "__name__", "") != patch_tensor_with_fix.__name__:  # once per process
        interpreter._patch_lang_tensor = patch_tensor_with_fix


_interpreter_scalar_index_fix()

# Globals read inside @triton.jit must be constexpr (compiled Triton rejects plain globals).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _fwd_partials_kernel(
    s_ptr,
    t_ptr,
    c_ptr,
    tau_s_ptr,
    tau_t_ptr,
    stud_ptr,
    teach_ptr,
    dots_ptr,  # partials: [B, n_split, 2, V_PAD], [B, n_split, 2, 2], [B, n_split, 2, V_PAD]
    B,
    V,
    K,
    n_split,
    tiles_per_split,
    BLOCK_K: tl.constexpr,
    V_PAD: tl.constexpr,
):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cs = LOG2E / tl.load(tau_s_ptr).to(tl.float32)
    ct = LOG2E / tl.load(tau_t_ptr).to(tl.float32)

    rows = tl.arange(0, V_PAD)
    row_ok = rows < V
    s_rows = (rows.to(tl.int64) * B + b) * K  # 64-bit: V*B*K can exceed 2**31
    t0_row = b * K
    t1_row = (B + b) * K

    ms = tl.full((V_PAD,), NEG_INF, tl.float32)  # running max of s_j (raw units)
    zs = tl.zeros((V_PAD,), tl.float32)  # running sum of exp2((s_j - ms) * cs)
    mt0 = tl.full((), NEG_INF, tl.float32)  # running max of u_i (raw units), one per teacher crop
    mt1 = tl.full((), NEG_INF, tl.float32)
    zt0 = tl.zeros((), tl.float32)  # running sum of exp2((u_i - mt_i) * ct)
    zt1 = tl.zeros((), tl.float32)
    d0 = tl.zeros((V_PAD,), tl.float32)  # running D_0j relative to (mt0, ms_j)
    d1 = tl.zeros((V_PAD,), tl.float32)

    k_first = split * tiles_per_split * BLOCK_K
    # num_stages: keep the next tiles' loads in flight (async copies) while this one is reduced.
    for tile in tl.range(0, tiles_per_split, num_stages=3):
        cols = k_first + tile * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
        u0 = tl.load(t_ptr + t0_row + cols, mask=col_ok, other=0.0) - c
        u1 = tl.load(t_ptr + t1_row + cols, mask=col_ok, other=0.0) - c
        u0 = tl.where(col_ok, u0, NEG_INF)
        u1 = tl.where(col_ok, u1, NEG_INF)
        ok = row_ok[:, None] & col_ok[None, :]
        # Masked loads fill with 0 (not -inf) so the compiler can pipeline them as async copies.
        s = tl.load(s_ptr + s_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.where(ok, s, NEG_INF)

        # Teacher: online max / sum; alpha rescales what was accumulated under the old max.
        # A still-empty max (-inf) is replaced by 0 so that -inf - -inf never makes a NaN.
        new_mt0 = tl.maximum(mt0, tl.max(u0, axis=0))
        new_mt1 = tl.maximum(mt1, tl.max(u1, axis=0))
        safe_mt0 = tl.where(new_mt0 == NEG_INF, 0.0, new_mt0)
        safe_mt1 = tl.where(new_mt1 == NEG_INF, 0.0, new_mt1)
        alpha0 = tl.exp2((mt0 - safe_mt0) * ct)
        alpha1 = tl.exp2((mt1 - safe_mt1) * ct)
        e0 = tl.exp2((u0 - safe_mt0) * ct)
        e1 = tl.exp2((u1 - safe_mt1) * ct)

        # Student: online max / sum per crop row.
        new_ms = tl.maximum(ms, tl.max(s, axis=1))
        safe_ms = tl.where(new_ms == NEG_INF, 0.0, new_ms)
        zs = zs * tl.exp2((ms - safe_ms) * cs) + tl.sum(tl.exp2((s - safe_ms[:, None]) * cs), axis=1)
        # Raising ms_j by delta lowers every accumulated (s_j - ms_j) by delta: D -= delta * Z.
        delta = safe_ms - tl.where(ms == NEG_INF, safe_ms, ms)  # 0 while the row is still empty
        s_rel = tl.where(ok, s - safe_ms[:, None], 0.0)
        zt0_old = zt0 * alpha0
        zt1_old = zt1 * alpha1
        d0 = d0 * alpha0 - delta * zt0_old + tl.sum(e0[None, :] * s_rel, axis=1)
        d1 = d1 * alpha1 - delta * zt1_old + tl.sum(e1[None, :] * s_rel, axis=1)
        zt0 = zt0_old + tl.sum(e0, axis=0)
        zt1 = zt1_old + tl.sum(e1, axis=0)
        ms = new_ms
        mt0 = new_mt0
        mt1 = new_mt1

    part = b * n_split + split
    tl.store(stud_ptr + part * 2 * V_PAD + rows, ms)
    tl.store(stud_ptr + part * 2 * V_PAD + V_PAD + rows, zs)
    tl.store(dots_ptr + part * 2 * V_PAD + rows, d0)
    tl.store(dots_ptr + part * 2 * V_PAD + V_PAD + rows, d1)
    tl.store(teach_ptr + part * 4 + 0, mt0)
    tl.store(teach_ptr + part * 4 + 1, zt0)
    tl.store(teach_ptr + part * 4 + 2, mt1)
    tl.store(teach_ptr + part * 4 + 3, zt1)


@triton.jit
def _merge_teacher(teach_ptr, dots_ptr, base, i, splits, split_ok, shift, ct, V_PAD: tl.constexpr):
    """Merge one teacher crop's chunk statistics: returns (max, log2 of sum, D_i.[V_PAD] / Z_i)."""
    mt = tl.load(teach_ptr + (base + splits) * 4 + 2 * i, mask=split_ok, other=NEG_INF)
    zt = tl.load(teach_ptr + (base + splits) * 4 + 2 * i + 1, mask=split_ok, other=0.0)
    rows = tl.arange(0, V_PAD)
    d = tl.load(
        dots_ptr + (base + splits)[:, None] * 2 * V_PAD + i * V_PAD + rows[None, :],
        mask=split_ok[:, None],
        other=0.0,
    )
    m = tl.max(mt, axis=0)
    alpha = tl.exp2((mt - m) * ct)  # 0 for masked splits (mt = -inf); m is finite since K >= 1
    z = tl.sum(zt * alpha, axis=0)
    dots = tl.sum(alpha[:, None] * (d - shift * zt[:, None]), axis=0)
    return m, tl.log2(z), dots / z


@triton.jit
def _fwd_combine_kernel(
    stud_ptr,
    teach_ptr,
    dots_ptr,
    tau_s_ptr,
    tau_t_ptr,
    stats_s_ptr,
    stats_t_ptr,
    img_loss_ptr,  # [V*B, 2], [2*B, 2] (max, log2 sum), [B]
    B,
    V,
    n_split,
    SPLIT_PAD: tl.constexpr,
    V_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tau_s = tl.load(tau_s_ptr).to(tl.float32)
    cs = LOG2E / tau_s
    ct = LOG2E / tl.load(tau_t_ptr).to(tl.float32)
    splits = tl.arange(0, SPLIT_PAD)
    split_ok = splits < n_split
    rows = tl.arange(0, V_PAD)
    row_ok = rows < V
    base = b * n_split

    at = (base + splits)[:, None] * 2 * V_PAD + rows[None, :]
    ms = tl.load(stud_ptr + at, mask=split_ok[:, None], other=NEG_INF)
    zs = tl.load(stud_ptr + at + V_PAD, mask=split_ok[:, None], other=0.0)
    m = tl.max(ms, axis=0)
    safe_m = tl.where(m == NEG_INF, 0.0, m)  # padding rows V..V_PAD-1 never saw a value
    z = tl.sum(zs * tl.exp2((ms - safe_m[None, :]) * cs), axis=0)
    # Chunk dot products are relative to the chunk's own student max; move them to the row max.
    shift = tl.where(ms == NEG_INF, 0.0, safe_m[None, :] - ms)

    mt0, log2_zt0, q0_dot = _merge_teacher(teach_ptr, dots_ptr, base, 0, splits, split_ok, shift, ct, V_PAD)
    mt1, log2_zt1, q1_dot = _merge_teacher(teach_ptr, dots_ptr, base, 1, splits, split_ok, shift, ct, V_PAD)

    # Crop 0 pairs with teacher 1 only, crop 1 with teacher 0 only, local crops with both.
    w0 = (rows != 0).to(tl.float32)
    w1 = (rows != 1).to(tl.float32)
    log2_z = tl.log2(tl.where(row_ok, z, 1.0))
    per_row = (w0 + w1) * log2_z * LN2 - (w0 * q0_dot + w1 * q1_dot) / tau_s
    tl.store(img_loss_ptr + b, tl.sum(tl.where(row_ok, per_row, 0.0), axis=0))

    s_rows = rows.to(tl.int64) * B + b
    tl.store(stats_s_ptr + s_rows * 2, m, mask=row_ok)
    tl.store(stats_s_ptr + s_rows * 2 + 1, log2_z, mask=row_ok)
    tl.store(stats_t_ptr + b * 2, mt0)
    tl.store(stats_t_ptr + b * 2 + 1, log2_zt0)
    tl.store(stats_t_ptr + (B + b) * 2, mt1)
    tl.store(stats_t_ptr + (B + b) * 2 + 1, log2_zt1)


@triton.jit
def _fwd_finalize_kernel(
    t_ptr,
    img_loss_ptr,
    loss_ptr,
    center_ptr,
    n_teacher_rows,
    B,
    K,
    norm,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < K
    acc = tl.zeros((BLOCK_C,), tl.float32)
    # Rows in blocks of BLOCK_R, blocks in order: a fixed reduction tree, no atomics.
    for r0 in tl.range(0, n_teacher_rows, BLOCK_R, num_stages=3):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < n_teacher_rows)[:, None] & col_ok[None, :]
        x = tl.load(t_ptr + r.to(tl.int64)[:, None] * K + cols[None, :], mask=ok, other=0.0)
        acc += tl.sum(x, axis=0)
    tl.store(center_ptr + cols, acc / n_teacher_rows, mask=col_ok)

    if pid == 0:
        total = tl.zeros((BLOCK_B,), tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bb = b0 + tl.arange(0, BLOCK_B)
            total += tl.load(img_loss_ptr + bb, mask=bb < B, other=0.0)
        tl.store(loss_ptr, tl.sum(total, axis=0) / norm)


@triton.jit
def _bwd_kernel(
    g_ptr,
    s_ptr,
    t_ptr,
    c_ptr,
    tau_s_ptr,
    tau_t_ptr,
    stats_s_ptr,
    stats_t_ptr,
    ds_ptr,
    B,
    V,
    K,
    n_pairs,
    BLOCK_K: tl.constexpr,
    V_PAD: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tau_s = tl.load(tau_s_ptr).to(tl.float32)
    cs = LOG2E / tau_s
    ct = LOG2E / tl.load(tau_t_ptr).to(tl.float32)
    # grad_output is read here, on the device: no host sync, and any upstream scale is honoured.
    scale = tl.load(g_ptr).to(tl.float32) / (tau_s * n_pairs * B)

    cols = tile.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rows = tl.arange(0, V_PAD)
    row_ok = rows < V
    s_rows = rows.to(tl.int64) * B + b

    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    u0 = tl.load(t_ptr + b * K + cols, mask=col_ok, other=0.0) - c
    u1 = tl.load(t_ptr + (B + b) * K + cols, mask=col_ok, other=0.0) - c
    mt0, log2_zt0 = tl.load(stats_t_ptr + b * 2), tl.load(stats_t_ptr + b * 2 + 1)
    mt1, log2_zt1 = tl.load(stats_t_ptr + (B + b) * 2), tl.load(stats_t_ptr + (B + b) * 2 + 1)
    # Masked lanes get exp2(-inf) = 0: their filler values could overflow against a row's stats.
    q0 = tl.exp2(tl.where(col_ok, (u0 - mt0) * ct - log2_zt0, NEG_INF))
    q1 = tl.exp2(tl.where(col_ok, (u1 - mt1) * ct - log2_zt1, NEG_INF))

    ms = tl.load(stats_s_ptr + s_rows * 2, mask=row_ok, other=0.0)
    log2_z = tl.load(stats_s_ptr + s_rows * 2 + 1, mask=row_ok, other=0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    offs = s_rows[:, None] * K + cols[None, :]
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    p = tl.exp2(tl.where(ok, (s - ms[:, None]) * cs - log2_z[:, None], NEG_INF))

    w0 = (rows != 0).to(tl.float32)
    w1 = (rows != 1).to(tl.float32)
    # n_j p_j - Qbar_j in fp32 before the single rounding to the student dtype: it cancels when
    # the student is confident and agrees with the teacher.
    diff = (w0 + w1)[:, None] * p - (w0[:, None] * q0[None, :] + w1[:, None] * q1[None, :])
    tl.store(ds_ptr + offs, (diff * scale).to(ds_ptr.dtype.element_ty), mask=ok)
