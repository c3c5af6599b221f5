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
- Full, uniform rows (the training top-k path, dense blocks) take `is_causal=True`; masks are only
  built when rows are ragged or a cache is read.

Shape legend: B batch, K tokens in the processed subset, L cache slots read, H query heads,
G kv heads, E head dim, D d_model.
"""

from __future__ import annotations

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


def rope_angles(pos_BK: torch.Tensor, e: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding by explicit positions (tokens of a subset keep their original positions):
    cos and sin [B, K, 1, E/2] of the angles, in `dtype` (at least float32), one table for a
    block's queries and keys (`rotate`)."""
    inv = 1.0 / (theta ** (torch.arange(0, e, 2, device=pos_BK.device, dtype=torch.float32) / e))
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
        _write(self, k_BKGE, v_BKGE, pos_BK, valid_BK)


class LayerRows:
    """Rows [lo, hi) of a LayerKV, as a LayerKV of their own: views, so writes land in the whole."""

    def __init__(self, whole: LayerKV, lo: int, hi: int):
        self.whole, self.lo, self.hi = whole, lo, hi
        self.max_len = whole.max_len

    def _view(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[self.lo:self.hi]

    k_BLGE = property(lambda self: self._view(self.whole.k_BLGE))
    v_BLGE = property(lambda self: self._view(self.whole.v_BLGE))
    valid_BL = property(lambda self: self._view(self.whole.valid_BL))

    def write(self, k_BKGE, v_BKGE, pos_BK, valid_BK):
        self.whole.allocate(k_BKGE, v_BKGE)
        _write(self, k_BKGE, v_BKGE, pos_BK, valid_BK)


def _write(layer, k_BKGE, v_BKGE, pos_BK, valid_BK) -> None:
    k_BLGE, v_BLGE, valid_BL = layer.k_BLGE, layer.v_BLGE, layer.valid_BL
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
    `rows(lo, hi)` is a cache of rows [lo, hi) only (views), so a decode step runs on the rows in
    use; `take_rows` moves sequences prefilled elsewhere into rows of this one."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.layers: dict[tuple[int, int], LayerKV] = {}

    def layer(self, key: tuple[int, int]) -> LayerKV:
        if key not in self.layers:
            self.layers[key] = LayerKV(self.batch, self.max_len)
        return self.layers[key]

    def rows(self, lo: int, hi: int) -> "KVRows":
        return KVRows(self, lo, hi)

    def keep_prefix(self, length_B: torch.Tensor) -> None:
        """Forget every slot at or after row b's `length_B[b]`: after a right-padded prefill of
        ragged prompts, the padding's keys must not outlive it (a later real token that skips a
        block would otherwise leave a padding key visible in that slot)."""
        for layer in self.layers.values():
            if layer.valid_BL is not None:
                slot_L = torch.arange(layer.max_len, device=layer.valid_BL.device)
                layer.valid_BL &= slot_L[None, :] < length_B.to(layer.valid_BL.device)[:, None]

    def take_rows(self, src: "KVCache", pairs: list[tuple[int, int]]) -> None:
        """Row `s` of `src` becomes row `d` of this cache, for each (s, d): sequences prefilled
        together in a cache of their own join the running batch's rows."""
        for key, layer in src.layers.items():
            if layer.k_BLGE is None:  # created but never written: nobody ran it (below)
                continue
            mine = self.layer(key)
            mine.allocate(layer.k_BLGE, layer.v_BLGE)
            L = min(layer.max_len, mine.max_len)
            for s, d in pairs:
                mine.k_BLGE[d, :L] = layer.k_BLGE[s, :L]
                mine.v_BLGE[d, :L] = layer.v_BLGE[s, :L]
                mine.valid_BL[d] = False
                mine.valid_BL[d, :L] = layer.valid_BL[s, :L]
        for key, mine in self.layers.items():  # a layer no newcomer reached: nothing of theirs in it
            theirs = src.layers.get(key)
            if (theirs is None or theirs.k_BLGE is None) and mine.valid_BL is not None:
                for _, d in pairs:  # the row's previous keys (another sequence's, or padding's) go
                    mine.valid_BL[d] = False


class KVRows:
    def __init__(self, whole: KVCache, lo: int, hi: int):
        self.whole, self.lo, self.hi = whole, lo, hi

    def layer(self, key: tuple[int, int]) -> LayerRows:
        return LayerRows(self.whole.layer(key), self.lo, self.hi)


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
        q = self.q_norm(self.wq(x_BKD).view(B, K, self.h, self.e))
        k = self.k_norm(self.wk(x_BKD).view(B, K, self.g, self.e))
        cos, sin = rope_angles(pos_BK, self.e, self.theta, upcast(q).dtype)  # one table for both
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        v = self.wv(x_BKD).view(B, K, self.g, self.e)
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
