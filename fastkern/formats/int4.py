"""int4 group-wise weights: ``w = (q - zero) * scale``, q and zero in 0..15 (GPTQ/AWQ).

Canonical layout: q packed two per byte along K, low nibble first -> uint8 [N, K/2];
scale float32 [N, K/group_size]; zero uint8 [N, K/group_size]. Symmetric int4 is
zero = 8.
"""
import torch


def check_group_size(k: int, group_size: int, what: str = "weight") -> int:
    """Validate group_size against K (group_size = -1 or None means one group per row)."""
    if group_size is None or group_size == -1:
        group_size = k
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError("int4: group_size must be a positive even integer (or -1 for K), got %r" % (group_size,))
    if k % group_size:
        raise ValueError(
            "int4: %s has K=%d input features, which is not divisible by group_size=%d; "
            "choose a group_size that divides %d" % (what, k, group_size, k)
        )
    return group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] from values 0..15 in q [N, K] (K even), low nibble first."""
    if q.shape[-1] % 2:
        raise ValueError("pack_int4: K must be even, got q of shape %s" % (tuple(q.shape),))
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 from packed uint8 [N, K/2]."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False):
    """Round-to-nearest group-wise int4.

    Asymmetric (default): per group, scale = (max - min) / 15 and
    zero = clamp(round(-min / scale), 0, 15). Symmetric: zero = 8 and
    scale = absmax / 7 (q in 1..15 after clamping, i.e. -7..7 around the zero).
    Returns (packed uint8 [N, K/2], scale float32 [N, G], zero uint8 [N, G]).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            "quantize_int4: weight must be a 2-D float tensor [N, K], got shape %s dtype %s"
            % (tuple(w.shape), w.dtype)
        )
    n, k = w.shape
    group_size = check_group_size(k, group_size)
    g = w.detach().float().reshape(n, k // group_size, group_size)
    if symmetric:
        absmax = g.abs().amax(dim=-1)
        scale = torch.where(absmax > 0, absmax / 7.0, torch.ones_like(absmax))
        zero = torch.full_like(scale, 8.0)
    else:
        lo = g.amin(dim=-1).clamp(max=0.0)
        hi = g.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / 15.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(n, k)), scale, zero.to(torch.uint8)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [N, K] from the canonical int4 format."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    group_size = check_group_size(k, group_size)
    g = q.reshape(n, k // group_size, group_size)
    w = (g - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(n, k)
