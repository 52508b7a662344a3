"""int8 formats: symmetric per-output-channel weights, symmetric per-token activations."""
import torch


def quantize_int8(w: torch.Tensor):
    """Symmetric per-output-channel int8: ``w ~= q * scale[:, None]``.

    w: float [N, K]. Returns (q int8 [N, K] in -127..127, scale float32 [N]).
    A row of zeros gets scale 1 (so it dequantizes to exact zeros).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            "quantize_int8: weight must be a 2-D float tensor [N, K], got shape %s dtype %s"
            % (tuple(w.shape), w.dtype)
        )
    wf = w.detach().float()
    absmax = wf.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / torch.full_like(absmax, 127.0), torch.ones_like(absmax))  # see quantize_per_token
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] from int8 q [N, K] and per-row scale [N]."""
    return q.float() * scale.float()[:, None]


def quantize_per_token(x: torch.Tensor):
    """Dynamic symmetric int8 quantization of each row (token) of x [..., K].

    ``s = absmax / 127`` and ``q = round_half_even(x / s)`` in fp32, clamped to
    -127..127 (never -128, so products fit vpmaddubsw-style int16 pairs). A row of
    zeros gets s = 0 and q = 0. A row holding NaN or inf gets q = 0 and s = NaN, so
    every output it feeds is NaN, as F.linear would not give a finite value either.
    Returns (q int8 [..., K], s float32 [..., 1]).
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[-1] > 0 else xf.new_zeros(xf.shape[:-1] + (1,))
    finite = torch.isfinite(absmax)
    # a tensor divisor: torch on CUDA turns division by a Python scalar into a
    # multiplication by its reciprocal, which is not absmax / 127 for every absmax
    scale = absmax / torch.full_like(absmax, 127.0)
    safe = torch.where(finite & (scale > 0), scale, torch.ones_like(scale))
    q = torch.round(xf / safe).clamp_(-127, 127)
    q = torch.where(finite, q, torch.zeros_like(q)).to(torch.int8)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale
