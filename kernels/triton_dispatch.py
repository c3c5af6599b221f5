"""Triton kernels for the MoE token path, with launchers that check their inputs.

Design choices
- Routing is described by one tensor, `dest_TK`: the row of the expert-contiguous buffer that
  token t's k-th copy goes to (-1: dropped). Every other kernel is a gather or a row-local
  reduction driven by it, so nothing needs atomics and every result is deterministic.
- (a) `_expert_rank_kernel`, one program per expert, walks the slots in order and gives each slot
  routed to its expert a stable rank (the order a stable sort would give) and the expert's count;
  `_dest_kernel` turns counts into exclusive offsets and writes dest = offset[expert] + rank.
- (b) `_permute_kernel` copies token rows to their dest rows, one copy per kept slot (a token is
  duplicated k times), optionally scaled per slot (the backward of combine reuses it).
- (c) `_combine_kernel` is the weighted scatter-add written as a gather-reduce: each token sums
  its k expert rows times their gates. Unweighted, it is the backward of permute.
- (d) `_slot_dot_kernel` gives the gate gradient: <grad of token t, expert row of slot (t, k)>.
- Pointer offsets are int64 (rows x hidden can pass 2^31 on large batches); accumulation is fp32.
- The interpreter (TRITON_INTERPRET=1, CPU tests) pays per program, so launchers pick larger
  blocks there; on GPUs blocks are sized for occupancy.

Shape legend: T tokens, K top-k, S = T*K slots, A kept rows, D hidden, E experts.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _expert_rank_kernel(idx_ptr, rank_ptr, counts_ptr, S, BLOCK_S: tl.constexpr):
    e = tl.program_id(0)
    running = tl.zeros((), dtype=tl.int64)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        m = offs < S
        ids = tl.load(idx_ptr + offs, mask=m, other=-1)
        hit = ids == e
        csum = tl.cumsum(hit.to(tl.int64), axis=0)
        tl.store(rank_ptr + offs, running + csum - 1, mask=m & hit)
        running += tl.sum(hit.to(tl.int64), axis=0)
    tl.store(counts_ptr + e, running)


@triton.jit
def _dest_kernel(idx_ptr, rank_ptr, counts_ptr, offsets_ptr, dest_ptr, S, E,
                 BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    e_offs = tl.arange(0, BLOCK_E)
    em = e_offs < E
    counts = tl.load(counts_ptr + e_offs, mask=em, other=0)
    if pid == 0:
        tl.store(offsets_ptr + e_offs, tl.cumsum(counts, axis=0) - counts, mask=em)
    offs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    m = offs < S
    ids = tl.load(idx_ptr + offs, mask=m, other=-1).to(tl.int64)
    kept = m & (ids >= 0)
    rank = tl.load(rank_ptr + offs, mask=kept, other=0)
    # offset of each slot's expert: the counts of all experts before it
    base = tl.sum(tl.where(e_offs[None, :] < ids[:, None], counts[None, :], 0), axis=1)
    tl.store(dest_ptr + offs, tl.where(kept, base + rank, -1), mask=m)


@triton.jit
def _permute_kernel(x_ptr, dest_ptr, scale_ptr, out_ptr, S, D, K, stride_x, stride_out,
                    HAS_SCALE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    sm = s < S
    dm = d < D
    dest = tl.load(dest_ptr + s, mask=sm, other=-1).to(tl.int64)
    keep = sm & (dest >= 0)
    t = (s // K).to(tl.int64)
    mask = keep[:, None] & dm[None, :]
    rows = tl.load(x_ptr + t[:, None] * stride_x + d[None, :], mask=mask, other=0.0)
    if HAS_SCALE:
        w = tl.load(scale_ptr + s, mask=keep, other=0.0).to(tl.float32)
        rows = (rows.to(tl.float32) * w[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + dest[:, None] * stride_out + d[None, :], rows, mask=mask)


@triton.jit
def _combine_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, T, D, stride_y, stride_out,
                    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < T
    dm = d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        dest = tl.load(dest_ptr + t * K + k, mask=tm, other=-1).to(tl.int64)
        keep = tm & (dest >= 0)
        rows = tl.load(y_ptr + dest[:, None] * stride_y + d[None, :], mask=keep[:, None] & dm[None, :], other=0.0)
        rows = rows.to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + t * K + k, mask=keep, other=0.0).to(tl.float32)
            rows = rows * w[:, None]
        acc += rows
    t64 = t.to(tl.int64)
    tl.store(out_ptr + t64[:, None] * stride_out + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tm[:, None] & dm[None, :])


@triton.jit
def _slot_dot_kernel(g_ptr, y_ptr, dest_ptr, out_ptr, S, D, K, stride_g, stride_y,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    sm = s < S
    dest = tl.load(dest_ptr + s, mask=sm, other=-1).to(tl.int64)
    keep = sm & (dest >= 0)
    t = (s // K).to(tl.int64)
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (d < D)[None, :]
        g = tl.load(g_ptr + t[:, None] * stride_g + d[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + dest[:, None] * stride_y + d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * y, axis=1)
    tl.store(out_ptr + s, acc.to(out_ptr.dtype.element_ty), mask=sm)


# --------------------------------------------------------------------------- launchers
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(rows: int, d: int, interpret: bool | None = None) -> tuple[int, int]:
    """(BLOCK_rows, BLOCK_D). The interpreter pays per program: few, large blocks there."""
    if interpreting() if interpret is None else interpret:
        return max(16, min(256, triton.next_power_of_2(max(rows, 1)))), max(16, min(1024, triton.next_power_of_2(d)))
    return 32, max(16, min(128, triton.next_power_of_2(d)))


def _route_blocks(num_experts: int, interpret: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_S of the rank kernel, BLOCK_S and BLOCK_E of the dest kernel)."""
    rank_bs = 1024 if (interpreting() if interpret is None else interpret) else 256
    block_e = triton.next_power_of_2(num_experts)
    return rank_bs, min(rank_bs, max(16, 4096 // block_e)), block_e


def _check(name: str, t: torch.Tensor, ndim: int, dtypes: tuple, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not (t.is_cuda or interpreting()):
        raise RuntimeError(f"{name} is on {t.device}: Triton kernels need a GPU (or TRITON_INTERPRET=1)")


def route(idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts_E, offsets_E, dest_TK), all int64; dest = -1 for dropped slots (expert id -1)."""
    _check("idx_TK", idx_TK, 2, INT_DTYPES)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    S = idx_TK.numel()
    dev = idx_TK.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    offsets = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    dest = torch.full(idx_TK.shape, -1, dtype=torch.int64, device=dev)
    if S == 0:
        return counts, offsets, dest
    rank = torch.zeros(S, dtype=torch.int64, device=dev)
    rank_bs, block_s, block_e = _route_blocks(num_experts)
    _expert_rank_kernel[(num_experts,)](idx_TK, rank, counts, S, BLOCK_S=rank_bs)
    _dest_kernel[(triton.cdiv(S, block_s),)](idx_TK, rank, counts, offsets, dest, S, num_experts,
                                             BLOCK_S=block_s, BLOCK_E=block_e)
    return counts, offsets, dest


def permute(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_rows: int,
            scale_TK: torch.Tensor | None = None) -> torch.Tensor:
    """x_AD[dest[t, k]] = x_TD[t] (* scale[t, k]) for every kept slot."""
    _check("x_TD", x_TD, 2, FLOAT_DTYPES)
    _check("dest_TK", dest_TK, 2, (torch.int64,), x_TD.device)
    T, D = x_TD.shape
    if dest_TK.shape[0] != T:
        raise ValueError(f"dest_TK has {dest_TK.shape[0]} rows, x_TD has {T} tokens")
    if scale_TK is not None:
        _check("scale_TK", scale_TK, 2, FLOAT_DTYPES, x_TD.device)
        if scale_TK.shape != dest_TK.shape:
            raise ValueError(f"scale_TK shape {tuple(scale_TK.shape)} != dest_TK shape {tuple(dest_TK.shape)}")
    out = torch.empty(num_rows, D, dtype=x_TD.dtype, device=x_TD.device)
    S, K = dest_TK.numel(), dest_TK.shape[1]
    if S == 0 or num_rows == 0 or D == 0:
        return out
    bs, bd = _blocks(S, D)
    grid = (triton.cdiv(S, bs), triton.cdiv(D, bd))
    _permute_kernel[grid](x_TD, dest_TK, scale_TK if scale_TK is not None else x_TD, out, S, D, K,
                          x_TD.stride(0), out.stride(0), HAS_SCALE=scale_TK is not None,
                          BLOCK_S=bs, BLOCK_D=bd)
    return out


def gather_sum(y_AD: torch.Tensor, dest_TK: torch.Tensor, weight_TK: torch.Tensor | None = None) -> torch.Tensor:
    """y_TD[t] = sum_k weight[t, k] * y_AD[dest[t, k]] over kept slots (weight 1 when None)."""
    _check("y_AD", y_AD, 2, FLOAT_DTYPES)
    _check("dest_TK", dest_TK, 2, (torch.int64,), y_AD.device)
    T, K = dest_TK.shape
    if not 1 <= K <= 8:
        raise ValueError(f"top-k must be between 1 and 8, got {K}")
    if weight_TK is not None:
        _check("weight_TK", weight_TK, 2, FLOAT_DTYPES, y_AD.device)
        if weight_TK.shape != dest_TK.shape:
            raise ValueError(f"weight_TK shape {tuple(weight_TK.shape)} != dest_TK shape {tuple(dest_TK.shape)}")
    D = y_AD.shape[1]
    out = torch.empty(T, D, dtype=y_AD.dtype, device=y_AD.device)
    if T == 0 or D == 0:
        return out
    bt, bd = _blocks(T, D)
    grid = (triton.cdiv(T, bt), triton.cdiv(D, bd))
    _combine_kernel[grid](y_AD, dest_TK, weight_TK if weight_TK is not None else y_AD, out, T, D,
                          y_AD.stride(0), out.stride(0), K=K, HAS_WEIGHT=weight_TK is not None,
                          BLOCK_T=bt, BLOCK_D=bd)
    return out


def slot_dot(g_TD: torch.Tensor, y_AD: torch.Tensor, dest_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gw_TK[t, k] = <g_TD[t], y_AD[dest[t, k]]> (0 for dropped slots)."""
    _check("g_TD", g_TD, 2, FLOAT_DTYPES)
    _check("y_AD", y_AD, 2, FLOAT_DTYPES, g_TD.device)
    _check("dest_TK", dest_TK, 2, (torch.int64,), g_TD.device)
    if g_TD.shape[1] != y_AD.shape[1]:
        raise ValueError(f"hidden sizes differ: g_TD {g_TD.shape[1]}, y_AD {y_AD.shape[1]}")
    S, K = dest_TK.numel(), dest_TK.shape[1]
    out = torch.zeros(dest_TK.shape, dtype=dtype, device=g_TD.device)
    if S == 0:
        return out
    bs, bd = _blocks(S, g_TD.shape[1])
    _slot_dot_kernel[(triton.cdiv(S, bs),)](g_TD, y_AD, dest_TK, out, S, g_TD.shape[1], K,
                                           g_TD.stride(0), y_AD.stride(0), BLOCK_S=bs, BLOCK_D=bd)
    return out


# --------------------------------------------------------------------------- ahead-of-time builds
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def specializations(dtypes, top_ks, num_experts, hidden_sizes) -> list[tuple[str, object, dict, dict]]:
    """Every (kernel, signature, constexprs) the launchers above produce on a GPU for these model
    settings: what `triton.compile(ASTSource(...), target=GPUTarget(...))` must build."""
    specs = []
    for e in sorted(set(num_experts)):
        rank_bs, block_s, block_e = _route_blocks(e, interpret=False)
        specs.append((f"rank[E={e}]", _expert_rank_kernel,
                      {"idx_ptr": "*i64", "rank_ptr": "*i64", "counts_ptr": "*i64", "S": "i32",
                       "BLOCK_S": "constexpr"}, {"BLOCK_S": rank_bs}))
        specs.append((f"dest[E={e}]", _dest_kernel,
                      {"idx_ptr": "*i64", "rank_ptr": "*i64", "counts_ptr": "*i64", "offsets_ptr": "*i64",
                       "dest_ptr": "*i64", "S": "i32", "E": "i32", "BLOCK_S": "constexpr", "BLOCK_E": "constexpr"},
                      {"BLOCK_S": block_s, "BLOCK_E": block_e}))
    for dt in dtypes:
        p = _PTR[dt]
        for d in sorted({_blocks(1, h, interpret=False)[1] for h in hidden_sizes}):
            bs = _blocks(1, 1, interpret=False)[0]
            for has_scale in (False, True):  # forward permute / backward of combine
                specs.append((f"permute[{dt},scale={has_scale},BD={d}]", _permute_kernel,
                              {"x_ptr": p, "dest_ptr": "*i64", "scale_ptr": "*fp32" if has_scale else p,
                               "out_ptr": p, "S": "i32", "D": "i32", "K": "i32", "stride_x": "i32",
                               "stride_out": "i32", "HAS_SCALE": "constexpr", "BLOCK_S": "constexpr",
                               "BLOCK_D": "constexpr"},
                              {"HAS_SCALE": has_scale, "BLOCK_S": bs, "BLOCK_D": d}))
            for k in sorted(set(top_ks)):
                for has_w in (True, False):  # forward combine / backward of permute
                    specs.append((f"combine[{dt},K={k},weight={has_w},BD={d}]", _combine_kernel,
                                  {"y_ptr": p, "dest_ptr": "*i64", "w_ptr": "*fp32" if has_w else p,
                                   "out_ptr": p, "T": "i32", "D": "i32", "stride_y": "i32",
                                   "stride_out": "i32", "K": "constexpr", "HAS_WEIGHT": "constexpr",
                                   "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                                  {"K": k, "HAS_WEIGHT": has_w, "BLOCK_T": bs, "BLOCK_D": d}))
            specs.append((f"slot_dot[{dt},BD={d}]", _slot_dot_kernel,
                          {"g_ptr": p, "y_ptr": p, "dest_ptr": "*i64", "out_ptr": "*fp32", "S": "i32",
                           "D": "i32", "K": "i32", "stride_g": "i32", "stride_y": "i32",
                           "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"},
                          {"BLOCK_S": bs, "BLOCK_D": d}))
    return specs


def compile_for(arch: int, specs) -> dict[str, int]:
    """Build each specialization for sm_<arch> without a GPU; returns the cubin size of each."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    sizes = {}
    for name, fn, signature, constexprs in specs:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", arch, 32))
        sizes[name] = len(kernel.asm["cubin"])
    return sizes
