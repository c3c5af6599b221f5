"""Plain-torch versions of the dispatch primitives: the CPU path and the kernels' reference.

Two flavours with the signatures of kernels/triton_dispatch.py:
- vectorised (`route`, `permute`, `gather_sum`, `slot_dot`, and `combine_backward`, which gives
  both of combine's gradients from one gather where route's row -> slot map exists): what runs
  whenever Triton does not (CPU tensors, HYDRA_KERNELS=torch). Stable argsort gives the same
  dest as the Triton ranks.
- deliberately naive loops (`*_loop`): one slot at a time, obviously right, for tests only.

Speed on the CPU: with top-k > 1, combine is one fused pass through `F.embedding_bag` with
per-sample weights (gather, scale and sum per token) where the data and the weights share a dtype;
with top-1 it is a row gather scaled in place, which is faster than bags of one. When no slot
was dropped (as many rows as slots) no keep-mask is built or applied. The row -> slot
map that permute needs comes from route's own sort (`route(..., with_slots=True)`) instead of
being rebuilt at every permute.

Shape legend: T tokens, K top-k, A kept rows, D hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulate in at least float32 (float64 stays float64 for gradient checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def route(idx_TK: torch.Tensor, num_experts: int, with_slots: bool = False):
    """(counts, offsets, dest), and with `with_slots` the slot that fills each row (`slot_A`)."""
    key_S = idx_TK.reshape(-1).long()
    key_S = torch.where(key_S < 0, num_experts, key_S)
    counts = torch.bincount(key_S, minlength=num_experts + 1)[:num_experts]
    offsets = torch.cumsum(counts, 0) - counts
    order_S = torch.argsort(key_S, stable=True)
    A = int(counts.sum())
    dest_S = torch.full_like(key_S, -1)
    dest_S[order_S[:A]] = torch.arange(A, device=idx_TK.device)
    out = (counts, offsets, dest_S.view(idx_TK.shape))
    return (*out, order_S[:A]) if with_slots else out


def slots(dest_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The inverse of dest: which top-k slot (t * K + k) fills each of the `num_rows` rows."""
    dest_S = dest_TK.reshape(-1)
    kept_S = (dest_S >= 0).nonzero().squeeze(1)
    slot_A = torch.empty(num_rows, dtype=torch.long, device=dest_TK.device)
    slot_A[dest_S[kept_S]] = kept_S
    return slot_A


def _token_rows(x_TD, slot_A, K):
    """Each row's token: row a holds slot slot_A[a] = t * K + k."""
    return x_TD.index_select(0, slot_A // K if K > 1 else slot_A)  # contiguous writes: much faster than scattering rows


def _scaled(rows_AD, scale_TK, slot_A, dtype):
    """Rows (fresh, from `_token_rows`) times their slots' scales, in `dtype`."""
    scale_A = scale_TK.reshape(-1)[slot_A]
    if scale_A.dtype == rows_AD.dtype:  # scaled in place: no second temporary
        return rows_AD.mul_(scale_A[:, None])
    return (_acc(rows_AD) * _acc(scale_A[:, None])).to(dtype)


def permute(x_TD, dest_TK, num_rows, scale_TK=None, slot_A=None):
    K = dest_TK.shape[1]
    slot_A = slots(dest_TK, num_rows) if slot_A is None else slot_A
    rows_AD = _token_rows(x_TD, slot_A, K)
    return rows_AD if scale_TK is None else _scaled(rows_AD, scale_TK, slot_A, x_TD.dtype)


def gather_sum(y_AD, dest_TK, weight_TK=None):
    T, K = dest_TK.shape
    if y_AD.shape[0] == 0:  # every slot dropped
        return y_AD.new_zeros(T, y_AD.shape[1])
    if y_AD.shape[0] == T * K:  # a row for every slot, so none dropped: no mask to apply
        idx_TK, w_TK = dest_TK, None if weight_TK is None else _acc(weight_TK)
    else:
        kept_TK = dest_TK >= 0
        w_TK = _acc(kept_TK if weight_TK is None else weight_TK * kept_TK)
        idx_TK = dest_TK.clamp(min=0)
    if K > 1 and (w_TK is None or w_TK.dtype == y_AD.dtype):  # each token's K rows gathered, weighted, summed in one pass
        return F.embedding_bag(idx_TK, y_AD, mode="sum", per_sample_weights=w_TK)
    out = _acc(y_AD.index_select(0, idx_TK[:, 0]))  # fresh: scaled in place
    if w_TK is not None:
        out.mul_(w_TK[:, :1])
    for k in range(1, K):  # one row gather per slot: no [T, K, D] temporary
        row = _acc(y_AD.index_select(0, idx_TK[:, k]))
        if w_TK is None:
            out.add_(row)
        else:
            out.addcmul_(row, w_TK[:, k:k + 1])
    return out.to(y_AD.dtype)


def combine_backward(g_TD, y_AD, w_TK, slot_A, need_gy: bool = True, need_gw: bool = True):
    """Both gradients of a weighted combine from one gather of the token gradients to the rows:
    the rows' gradient (the gates' scaled permute of g) and each kept slot's gate gradient (its
    row's dot product with g; 0 for dropped slots). `slot_A` is route's row -> slot map."""
    g_AD = _token_rows(g_TD, slot_A, w_TK.shape[1])
    gw = None
    if need_gw:  # before the rows are scaled in place
        gw_S = torch.zeros(w_TK.numel(), dtype=w_TK.dtype, device=w_TK.device)
        gw_S[slot_A] = (_acc(g_AD) * _acc(y_AD)).sum(-1).to(w_TK.dtype)
        gw = gw_S.view(w_TK.shape)
    return (_scaled(g_AD, w_TK, slot_A, g_TD.dtype) if need_gy else None), gw


def slot_dot(g_TD, y_AD, dest_TK, dtype):
    if y_AD.shape[0] == 0:
        return torch.zeros(dest_TK.shape, dtype=dtype, device=g_TD.device)
    kept_TK = dest_TK >= 0
    rows_TKD = _acc(y_AD[dest_TK.clamp(min=0)])
    return ((rows_TKD * _acc(g_TD[:, None, :])).sum(-1) * kept_TK).to(dtype)


# --------------------------------------------------------------------------- naive loops (tests)
def route_loop(idx_TK, num_experts):
    T, K = idx_TK.shape
    counts = [0] * num_experts
    for t in range(T):
        for k in range(K):
            e = int(idx_TK[t, k])
            if e >= 0:
                counts[e] += 1
    offsets = [sum(counts[:e]) for e in range(num_experts)]
    filled = list(offsets)
    dest = torch.full((T, K), -1, dtype=torch.int64)
    for e in range(num_experts):  # slots in order, expert by expert
        for s in range(T * K):
            if int(idx_TK[s // K, s % K]) == e:
                dest[s // K, s % K] = filled[e]
                filled[e] += 1
    return torch.tensor(counts), torch.tensor(offsets), dest


def permute_loop(x_TD, dest_TK, num_rows, scale_TK=None):
    out = torch.zeros(num_rows, x_TD.shape[1], dtype=x_TD.dtype)
    for t in range(dest_TK.shape[0]):
        for k in range(dest_TK.shape[1]):
            r = int(dest_TK[t, k])
            if r >= 0:
                w = 1.0 if scale_TK is None else float(scale_TK[t, k])
                out[r] = (x_TD[t].float() * w).to(x_TD.dtype)
    return out


def gather_sum_loop(y_AD, dest_TK, weight_TK=None):
    out = torch.zeros(dest_TK.shape[0], y_AD.shape[1], dtype=torch.float32)
    for t in range(dest_TK.shape[0]):
        for k in range(dest_TK.shape[1]):
            r = int(dest_TK[t, k])
            if r >= 0:
                w = 1.0 if weight_TK is None else float(weight_TK[t, k])
                out[t] += w * y_AD[r].float()
    return out.to(y_AD.dtype)
