"""Data-free int4 quantization with a per-group search for the clipping range.

Round-to-nearest (``quantize_int4``) maps each group's [min, max] onto 0..15. One
outlier then stretches the step for the whole group and the many small weights
lose precision; clipping the range a little trades a large error on the outlier
for a smaller error everywhere else. This module searches, group by group, the
pair (shrink of min, shrink of max) that minimizes the squared reconstruction
error (by default the two shrink together along a 1-D grid: on real weights a 2-D
grid costs ``steps`` times more and gains under 1%), then refines the scale by
least squares for the chosen integers and tries the neighbouring zero points (the
zero point stays an integer in 0..15, as the canonical format requires). The RTN range
is one of the candidates, so no group ends up worse than round-to-nearest.

The result is the canonical triple of ``quantize_int4``:
(packed uint8 [N, K/2], scale float32 [N, K/group], zero uint8 [N, K/group]).
"""
import torch

from fastkern.formats.int4 import check_group_size, pack_int4

# rows of groups handled at once: bounds the temporaries to a few MB per candidate
_CHUNK_ELEMS = 1 << 20


def _shrink_grid(steps: int, min_shrink: float) -> torch.Tensor:
    return torch.linspace(1.0, min_shrink, steps)


def _quant(g, scale, zero):
    return torch.round(g / scale[..., None] + zero[..., None]).clamp_(0, 15)


def _err(g, q, scale, zero, wt):
    d = g - (q - zero[..., None]) * scale[..., None]
    d = d * d
    if wt is not None:
        d = d * wt
    return d.sum(-1)


def _range_params(lo, hi):
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp_(0, 15)
    return scale, zero


def search_int4_params(g: torch.Tensor, weight: torch.Tensor = None, steps: int = 20, min_shrink: float = 0.5,
                       refine: int = 1, joint: bool = True):
    """Best (scale, zero) for each row of ``g`` [R, group] (float32).

    ``weight`` (broadcastable to g, e.g. [group] or [R, group]) weights each
    coordinate's squared error, so a caller with input statistics (GPTQ's Hessian
    diagonal) can make the search favour the columns that matter. Returns scale
    float32 [R] and zero float32 [R] holding integers in 0..15.
    """
    lo0 = g.amin(-1).clamp(max=0.0)
    hi0 = g.amax(-1).clamp(min=0.0)
    best_scale, best_zero = _range_params(lo0, hi0)
    best_err = _err(g, _quant(g, best_scale, best_zero), best_scale, best_zero, weight)
    grid = _shrink_grid(steps, min_shrink).tolist()
    pairs = [(a, a) for a in grid[1:]] if joint else [(a, b) for a in grid for b in grid][1:]
    for a, b in pairs:
        scale, zero = _range_params(lo0 * a, hi0 * b)
        err = _err(g, _quant(g, scale, zero), scale, zero, weight)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    for _ in range(refine):
        # for fixed integers the error is quadratic in the scale: solve it, then try
        # the neighbouring zero points with their own least-squares scale
        q = _quant(g, best_scale, best_zero)
        for dz in (0.0, -1.0, 1.0):
            zero = (best_zero + dz).clamp(0, 15)
            c = q - zero[..., None]
            wc = c if weight is None else c * weight
            den = (wc * c).sum(-1)
            num = (wc * g).sum(-1)
            scale = torch.where(den > 0, num / den.clamp(min=1e-30), best_scale)
            scale = torch.where(scale > 0, scale, best_scale)
            err = _err(g, _quant(g, scale, zero), scale, zero, weight)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_int4_search(w: torch.Tensor, group_size: int = 128, *, steps: int = 20, min_shrink: float = 0.5,
                         refine: int = 1, joint: bool = True, col_weight: torch.Tensor = None):
    """Group-wise asymmetric int4 with a searched clipping range per group.

    Same output as ``fastkern.formats.quantize_int4``: (packed uint8 [N, K/2],
    scale float32 [N, K/group_size], zero uint8 [N, K/group_size]), and never a larger
    squared reconstruction error than it in any group. ``steps`` range candidates
    are tried per group, shrinking min and max together down to ``min_shrink``
    (``joint=False``: independently, ``steps`` x ``steps`` candidates); ``col_weight`` [K] optionally weights the error of each input
    column (e.g. the mean squared activation of that input feature).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            "quantize_int4_search: weight must be a 2-D float tensor [N, K], got shape %s dtype %s"
            % (tuple(w.shape), w.dtype)
        )
    n, k = w.shape
    group_size = check_group_size(k, group_size)
    groups = k // group_size
    if col_weight is not None:
        if col_weight.shape != (k,):
            raise ValueError("quantize_int4_search: col_weight must have shape [%d], got %s" % (k, tuple(col_weight.shape)))
        col_weight = col_weight.detach().float().to(w.device).reshape(groups, group_size)
    g = w.detach().float().reshape(n, groups, group_size)
    scale = torch.empty(n, groups, dtype=torch.float32, device=w.device)
    zero = torch.empty(n, groups, dtype=torch.float32, device=w.device)
    rows = max(1, _CHUNK_ELEMS // max(k, 1))
    for r in range(0, n, rows):
        s, z = search_int4_params(g[r : r + rows], col_weight, steps=steps, min_shrink=min_shrink, refine=refine,
                                  joint=joint)
        scale[r : r + rows], zero[r : r + rows] = s, z
    q = _quant(g, scale, zero)
    return pack_int4(q.reshape(n, k)), scale, zero.to(torch.uint8)
