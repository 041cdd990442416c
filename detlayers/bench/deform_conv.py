"""Deformable convolution (DCNv2, modulated) vs ``torchvision.ops.deform_conv2d``.

ResNet stage-3 sized feature maps: CPU ``N=2, C=O=256, 64x64``; GPU ``N=8, C=O=256, 100x152``;
3x3 kernel, padding 1, deformable groups 1 and 4.  "fwd" times the output; "fwd+bwd" the output and
the gradients w.r.t. input, offset, mask and kernel (PyTorch: ``torch.autograd.grad`` with the same
upstream gradient).  PyTorch runs NCHW on the same values.  Measured tables: BENCHMARKS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from detlayers.bench import Case
from detlayers.deform_conv import modulated_deform_conv


def _problem(n: int, c: int, h: int, w: int, dg: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = 9
    f32 = np.float32
    return dict(
        input=rng.standard_normal((n, h, w, c)).astype(f32),
        offset=(2.0 * rng.standard_normal((n, h, w, 2 * dg * k))).astype(f32),
        mask=rng.uniform(0, 1, (n, h, w, dg * k)).astype(f32),
        kernel=(0.05 * rng.standard_normal((3, 3, c, c))).astype(f32),
        bias=rng.standard_normal((c,)).astype(f32),
        grad_out=rng.standard_normal((n, h, w, c)).astype(f32),
    )


def _ours(p: dict[str, np.ndarray], dg: int, device: jax.Device):
    arrays = {k: jax.device_put(jnp.asarray(v), device) for k, v in p.items()}

    def forward(x, offset, mask, kernel, bias):
        return modulated_deform_conv(
            x, offset, mask, kernel, bias, padding=1, deformable_groups=dg
        )

    fwd = jax.jit(forward)

    @jax.jit
    def fwd_bwd(x, offset, mask, kernel, bias, grad_out):
        out, vjp = jax.vjp(forward, x, offset, mask, kernel, bias)
        return out, vjp(grad_out)

    a = arrays
    args = (a["input"], a["offset"], a["mask"], a["kernel"], a["bias"])
    return (lambda: fwd(*args)), (lambda: fwd_bwd(*args, a["grad_out"]))


def _torch(p: dict[str, np.ndarray], device: str):
    try:
        import torch
        from torchvision.ops import deform_conv2d
    except ImportError:
        return None, None

    def nchw(a):
        return torch.tensor(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))), device=device)

    x, offset, mask, grad_out = (nchw(p[k]) for k in ("input", "offset", "mask", "grad_out"))
    weight = torch.tensor(
        np.ascontiguousarray(np.transpose(p["kernel"], (3, 2, 0, 1))), device=device
    )
    bias = torch.tensor(p["bias"], device=device)
    leaves = [t.requires_grad_(True) for t in (x, offset, mask, weight)]

    def fwd():
        with torch.no_grad():
            return deform_conv2d(x, offset, weight, bias, padding=(1, 1), mask=mask)

    def fwd_bwd():
        out = deform_conv2d(x, offset, weight, bias, padding=(1, 1), mask=mask)
        return out, torch.autograd.grad(out, leaves, grad_out)

    return fwd, fwd_bwd


def cases(platform: str) -> list[Case]:
    """The deform_conv rows for ``platform`` (``"cpu"`` or ``"gpu"``): modulated_deform_conv
    forward and forward+backward with deformable groups 1 and 4, sizes as in the module docstring;
    ``torch`` is None when torch/torchvision (or CUDA, on ``"gpu"``) is unavailable."""
    n, c, h, w = (2, 256, 64, 64) if platform == "cpu" else (8, 256, 100, 152)
    torch_device = "cpu" if platform == "cpu" else "cuda"
    device = jax.devices()[0]
    out: list[Case] = []
    for dg in (1, 4):
        p = _problem(n, c, h, w, dg)
        ours_fwd, ours_fwd_bwd = _ours(p, dg, device)
        try:
            torch_fwd, torch_fwd_bwd = _torch(p, torch_device)
        except Exception:  # torch without the matching device
            torch_fwd = torch_fwd_bwd = None
        size = f"N={n} C={c} {h}x{w} 3x3 dg={dg}"
        out.append(Case("deform_conv", f"modulated_deform_conv fwd {size}", ours_fwd, torch_fwd))
        out.append(
            Case(
                "deform_conv", f"modulated_deform_conv fwd+bwd {size}", ours_fwd_bwd,
                torch_fwd_bwd,
            )
        )
    return out
