"""Causal self-attention: grouped-query heads, RoPE, QK-norm, and a KV cache keyed by position.

Design choices
- Attention runs on a *subset* of a sequence's tokens: MoD and MoR gather the tokens a block
  processes into `x_BKD` with their original positions `pos_BK` (and `valid_BK` when rows hold
  different counts). RoPE uses the original positions, and because the subset keeps token order
  a causal mask over the subset is causal over positions. Unselected tokens are neither queries
  nor keys, exactly as if the block did not exist for them.
- The KV cache stores K/V at absolute positions with a `valid` flag per slot, one cache layer per
  (block, recursion). A token that skips a block (MoD) or stops recursing (MoR) leaves its slot
  invalid, so a later token attends to exactly the keys it would see if the prefix were recomputed.
- A packed forward (`KVCache.packed()`) runs sequences at different stages together, vLLM's
  mixed batch: one batch row of their tokens, a decoding sequence's one new token beside a
  newcomer's whole prompt, so joining the batch costs no forward of its own. Each position
  carries its sequence's cache row (`pack_positions`), which MoD/MoR's gathers keep with the
  token; attention regroups the queries by row. Every decision at generation is per token, so
  packing changes nothing else.
- Full, uniform rows (the training top-k path, dense blocks) take `is_causal=True`; masks are only
  built when rows are ragged or a cache is read.

Shape legend: B batch, K tokens in the processed subset, L cache slots read, H query heads,
G kv heads, E head dim, D d_model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmax-like math; float64 stays float64 (gradient checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@functools.lru_cache(maxsize=32)
def _inverse_frequencies(e: int, theta: float, device: torch.device) -> torch.Tensor:
    """RoPE's E/2 inverse frequencies in float32, made once per (head size, theta, device): a
    forward applies attention a dozen times, and each rebuilt them in four operators."""
    with torch.inference_mode(False):  # a normal tensor, usable by training's forwards too
        return 1.0 / (theta ** (torch.arange(0, e, 2, device=device, dtype=torch.float32) / e))


def rope_angles(pos_BK: torch.Tensor, e: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding by explicit positions (tokens of a subset keep their original positions):
    cos and sin [B, K, 1, E/2] of the angles, in `dtype` (at least float32), one table for a
    block's queries and keys (`rotate`)."""
    inv = _inverse_frequencies(e, float(theta), pos_BK.device)
    ang = pos_BK.to(dtype)[..., None] * inv.to(dtype)  # B K E/2
    return ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]


def rotate(x_BKHE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = upcast(x_BKHE).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x_BKHE.dtype)


class LayerKV:
    """K/V of one (block, recursion) for every position of a generation, plus which slots hold a key.
    Storage is allocated at the first write, in K's dtype (bfloat16 under autocast)."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k_BLGE: torch.Tensor | None = None
        self.v_BLGE: torch.Tensor | None = None
        self.valid_BL: torch.Tensor | None = None

    def allocate(self, k_BKGE: torch.Tensor, v_BKGE: torch.Tensor) -> None:
        if self.k_BLGE is None:
            shape = (self.batch, self.max_len, *k_BKGE.shape[2:])
            self.k_BLGE = k_BKGE.new_zeros(shape)
            self.v_BLGE = v_BKGE.new_zeros(shape)
            self.valid_BL = torch.zeros(self.batch, self.max_len, dtype=torch.bool, device=k_BKGE.device)

    def write(self, k_BKGE, v_BKGE, pos_BK, valid_BK):
        self.allocate(k_BKGE, v_BKGE)
        k_BLGE, v_BLGE, valid_BL = self.k_BLGE, self.v_BLGE, self.valid_BL
        if valid_BK is None:
            valid_BK = torch.ones(pos_BK.shape, dtype=torch.bool, device=pos_BK.device)
        b, j = valid_BK.nonzero(as_tuple=True)
        p = pos_BK[b, j]
        if p.numel() and int(p.max()) >= k_BLGE.shape[1]:
            raise ValueError(f"position {int(p.max())} is beyond the cache length {k_BLGE.shape[1]}")
        k_BLGE[b, p] = k_BKGE[b, j]
        v_BLGE[b, p] = v_BKGE[b, j]
        valid_BL[b, p] = True


class KVCache:
    """Per-(block, recursion) caches of `batch` rows (sequences); layers are created on first use.
    `packed()` is the cache of a packed forward (KVPacked), where sequences at different
    stages (a prompt, one new token) share one forward."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.layers: dict[tuple[int, int], LayerKV] = {}

    def layer(self, key: tuple[int, int]) -> LayerKV:
        if key not in self.layers:
            self.layers[key] = LayerKV(self.batch, self.max_len)
        return self.layers[key]

    def forget(self, rows: list[int], start: list[int] | None = None) -> None:
        """Forget the keys of these rows from slot `start[i]` on (every slot when None), in every
        layer. A sequence that takes a row over must not see its previous occupant's keys in a slot
        it leaves unwritten (a block or recursion it skips); nor may a forward that was stopped
        leave keys where its rerun writes none."""
        rows_R = torch.tensor(rows, dtype=torch.long)  # a tensor index: anything but row numbers is an error
        start_R = torch.zeros(len(rows), dtype=torch.long) if start is None else torch.tensor(start, dtype=torch.long)
        for layer in self.layers.values():
            if layer.valid_BL is not None:
                dev = layer.valid_BL.device
                slot_L = torch.arange(layer.max_len, device=dev)
                keep_RL = slot_L[None, :] < start_R.to(dev)[:, None]
                r = rows_R.to(dev)
                layer.valid_BL[r] = layer.valid_BL[r] & keep_RL

    def packed(self) -> "KVPacked":
        return KVPacked(self)


PACKED = 1 << 32  # packed positions: cache row * PACKED + position (`pack_positions`)


def pack_positions(row_N: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
    """Each token's cache row and position as one integer, the position a packed forward runs with.
    MoD and MoR gather positions with the tokens they select, so the row travels along unchanged."""
    return row_N * PACKED + pos_N


class KVPacked:
    """The cache as a packed forward reads and writes it: one batch row (B = 1) holding tokens of
    several sequences, each sequence's tokens together and in order, the sequences in ascending
    cache-row order, each token's position carrying
    its sequence's cache row (`pack_positions`). A decoding sequence brings one token, a newcomer
    its whole prompt: the prefill of one joins the decode step of the others."""

    def __init__(self, whole: KVCache):
        self.whole = whole

    def layer(self, key: tuple[int, int]) -> "PackedLayer":
        return PackedLayer(self.whole.layer(key))


class PackedLayer:
    # a packed forward whose tokens times slots read stay within this attends token by token, each
    # against a copy of its row's slots (K single queries, no regrouping); beyond it, by sequence
    PER_TOKEN = 1 << 13  # measured: faster below ~10k (a 64-token prompt beside 15 rows), slower above

    def __init__(self, whole: LayerKV):
        self.whole = whole

    def attend(self, q_KHE, k_KGE, v_KGE, row_K, pos_K, valid_K, gqa: bool) -> torch.Tensor:
        """Write the tokens' keys into their rows, then each token attends to its own row's slots up
        to its position: [K, H, E]. Sequences bringing one token (decoding) attend as one batch of
        single queries, sequences bringing several (prompts) as another, right-padded; a decode
        step pads nothing, and the prompts' padding never multiplies the decoding rows. While the
        tokens times the slots they read stay within PER_TOKEN, every token is instead a single
        query against a copy of its own row: no regrouping (a 13-token prompt beside 15 decoding
        rows: a fifth less time in the whole forward on the demo checkpoint). Writes and
        reads go by flat slot index (one `index_copy_` each), and rows in use that are consecutive
        are read as views: advanced indexing cost several times more per call here."""
        layer = self.whole
        layer.allocate(k_KGE[None], v_KGE[None])
        if valid_K is not None:
            keep = valid_K.nonzero().squeeze(1)
            r_W, p_W, k_W, v_W = row_K[keep], pos_K[keep], k_KGE[keep], v_KGE[keep]
        else:
            r_W, p_W, k_W, v_W = row_K, pos_K, k_KGE, v_KGE
        top = int(pos_K.max())  # the furthest slot any token reads (or writes)
        if top >= layer.max_len:
            raise ValueError(f"position {top} is beyond the cache length {layer.max_len}")
        slot_W = r_W * layer.max_len + p_W
        layer.k_BLGE.view(-1, *k_W.shape[1:]).index_copy_(0, slot_W, k_W)
        layer.v_BLGE.view(-1, *v_W.shape[1:]).index_copy_(0, slot_W, v_W)
        layer.valid_BL.view(-1).index_fill_(0, slot_W, True)
        seq_R, inv_K, n_R = torch.unique_consecutive(row_K, return_inverse=True, return_counts=True)
        K = row_K.shape[0]
        if seq_R.shape[0] == K:  # a decode step: one query per sequence, nothing to regroup
            return self._attend(q_KHE[:, None], seq_R, pos_K[:, None], top + 1, False, gqa)[:, 0]
        if K * (top + 1) <= self.PER_TOKEN:  # few slots in all: each token reads a copy of its row
            return self._attend(q_KHE[:, None], row_K, pos_K[:, None], top + 1, False, gqa, views=False)[:, 0]
        out = torch.empty_like(q_KHE)
        col_K = torch.arange(K, device=row_K.device) - (n_R.cumsum(0) - n_R)[inv_K]
        for group_R in (n_R == 1, n_R > 1):
            tok = group_R[inv_K].nonzero().squeeze(1)  # this group's tokens
            if tok.numel() == 0:
                continue
            rows_G = seq_R[group_R]
            G, Q = rows_G.shape[0], int(n_R[group_R].max())
            at_K = (group_R.cumsum(0) - 1)[inv_K[tok]] * Q + col_K[tok]  # (its sequence, its column)
            q_XHE = q_KHE.new_zeros(G * Q, *q_KHE.shape[1:]).index_copy_(0, at_K, q_KHE[tok])
            pos_X = torch.full((G * Q,), -1, dtype=pos_K.dtype, device=pos_K.device).index_copy_(0, at_K, pos_K[tok])
            res = self._attend(q_XHE.view(G, Q, *q_KHE.shape[1:]), rows_G, pos_X.view(G, Q), top + 1,
                               tok.numel() < G * Q, gqa)
            out.index_copy_(0, tok, res.reshape(G * Q, *q_KHE.shape[1:]).index_select(0, at_K))
        return out

    def _attend(self, q_RQHE, rows_R, pos_RQ, L: int, padded: bool, gqa: bool, views: bool = True) -> torch.Tensor:
        """Queries [R, Q, H, E] at positions `pos_RQ` (-1: padding, if `padded`) against the first
        `L` slots of cache rows `rows_R` (ascending: a packed batch holds its sequences in cache-row
        order; distinct unless `views` is False, which always copies the rows)."""
        layer = self.whole
        R = rows_R.shape[0]
        lo, hi = rows_R[[0, -1]].tolist()
        if views and hi - lo + 1 == R:  # consecutive rows: views
            k_RLGE, v_RLGE = layer.k_BLGE[lo:lo + R, :L], layer.v_BLGE[lo:lo + R, :L]
            valid_RL = layer.valid_BL[lo:lo + R, :L]
        else:
            k_RLGE = layer.k_BLGE[:, :L].index_select(0, rows_R)
            v_RLGE = layer.v_BLGE[:, :L].index_select(0, rows_R)
            valid_RL = layer.valid_BL[:, :L].index_select(0, rows_R)
        slot_L = torch.arange(L, device=pos_RQ.device)
        mask_RQL = (slot_L <= pos_RQ[..., None]) & valid_RL[:, None, :]
        if padded:  # padding queries see slot 0 so no row is empty (no NaN)
            mask_RQL[:, :, 0] |= pos_RQ < 0
        out = F.scaled_dot_product_attention(q_RQHE.transpose(1, 2), k_RLGE.transpose(1, 2), v_RLGE.transpose(1, 2),
                                             attn_mask=mask_RQL[:, None], enable_gqa=gqa)
        return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float, eps: float):
        super().__init__()
        self.h, self.g, self.e = n_heads, n_kv_heads, d_model // n_heads
        self.theta = rope_theta
        self.wq = nn.Linear(d_model, n_heads * self.e, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.e, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.e, bias=False)
        self.wo = nn.Linear(n_heads * self.e, d_model, bias=False)
        self.q_norm = RMSNorm(self.e, eps)  # QK-norm: bounded logits, stable at high LR
        self.k_norm = RMSNorm(self.e, eps)

    def forward(
        self,
        x_BKD: torch.Tensor,
        pos_BK: torch.Tensor,
        valid_BK: torch.Tensor | None = None,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        B, K, _ = x_BKD.shape
        packed = isinstance(cache, PackedLayer)
        if packed:  # positions carry each token's cache row (pack_positions)
            row_BK, pos_BK = pos_BK // PACKED, pos_BK % PACKED
        q = self.q_norm(self.wq(x_BKD).view(B, K, self.h, self.e))
        k = self.k_norm(self.wk(x_BKD).view(B, K, self.g, self.e))
        cos, sin = rope_angles(pos_BK, self.e, self.theta, upcast(q).dtype)  # one table for both
        q, k = rotate(torch.cat([q, k], dim=2), cos, sin).split([self.h, self.g], dim=2)  # one pass for both
        v = self.wv(x_BKD).view(B, K, self.g, self.e)
        if packed:
            if B != 1:
                raise ValueError(f"a packed forward has one batch row, got {B}")
            out_KHE = cache.attend(q[0], k[0], v[0], row_BK[0], pos_BK[0],
                                   None if valid_BK is None else valid_BK[0], self.g != self.h)
            return self.wo(out_KHE.reshape(1, K, self.h * self.e))
        q_BHKE = q.transpose(1, 2)
        if cache is not None:
            cache.write(k, v, pos_BK, valid_BK)
            L = int(pos_BK.max()) + 1
            k_BGLE = cache.k_BLGE[:, :L].transpose(1, 2)
            v_BGLE = cache.v_BLGE[:, :L].transpose(1, 2)
            slot_L = torch.arange(L, device=x_BKD.device)
            mask_BKL = (slot_L[None, None, :] <= pos_BK[:, :, None]) & cache.valid_BL[:, None, :L]
        else:
            k_BGLE, v_BGLE = k.transpose(1, 2), v.transpose(1, 2)
            mask_BKL = None
            if valid_BK is not None:
                causal_KK = torch.ones(K, K, dtype=torch.bool, device=x_BKD.device).tril()
                mask_BKL = causal_KK[None] & valid_BK[:, None, :]
        if mask_BKL is not None:
            if valid_BK is not None:  # padding queries see slot 0 so no row is empty (no NaN)
                mask_BKL[:, :, 0] |= ~valid_BK
            out = F.scaled_dot_product_attention(
                q_BHKE, k_BGLE, v_BGLE, attn_mask=mask_BKL[:, None], enable_gqa=self.g != self.h
            )
        else:
            out = F.scaled_dot_product_attention(
                q_BHKE, k_BGLE, v_BGLE, is_causal=True, enable_gqa=self.g != self.h
            )
        return self.wo(out.transpose(1, 2).reshape(B, K, self.h * self.e))
