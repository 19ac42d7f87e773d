#!/usr/bin/env python3
"""make_peft_golden.py for C3A: PEFT's forward, evaluated in float64 and differentiated by autograd.

PEFT's C3ALinear.forward and get_delta_weight cast the input and c3a_kernel to torch.float32
before the FFTs (whatever the model's dtype), so make_peft_golden.py's float64 reference would
carry float32 rounding in every C3A term (~1e-7 relative). This wrapper runs the same script with
those casts resolving to float64 while the module's input (forward) or base weight (merge) is
float64: the reference is PEFT's own code evaluated in double. The float32 run (y32), the saved
adapter (F32 c3a_kernel) and everything else are untouched.

PEFT's hand-written BlockCircularConvolution.backward returns a wrong input gradient (it
correlates grad_output with the kernel where the adjoint convolves: dx_j = sum_t g_t K[(t + j) mod b]
instead of K[(j - t) mod b]; torch.autograd.gradcheck fails on it, the kernel gradient is right).
The wrapper therefore replaces BlockCircularConvolution.apply by the same forward expression
written with torch.fft ops, so autograd gives the exact gradients: grad_input, grad_x and the
kernel gradients of every layer but the last (which receive dx from the layer above) are those of
PEFT's forward, not of its backward. docs/methods/c3a.md has the derivation.

Usage: python3 scripts/make_c3a_golden.py CASE '{"peft_type": "C3A", ...}' [make_peft_golden.py options]
"""
import functools
import os
import sys

import torch
import peft.tuners.c3a.layer as c3a_layer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_peft_golden  # noqa: E402


class _TorchIn64:
    """`torch` as c3a/layer.py sees it: float32 means float64 while `on`."""

    on = False

    def __getattr__(self, name):
        if name == "float32" and _TorchIn64.on:
            return torch.float64
        return getattr(torch, name)


def _in_double(method, is_double):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        previous = _TorchIn64.on
        _TorchIn64.on = is_double(self, *args)
        try:
            return method(self, *args, **kwargs)
        finally:
            _TorchIn64.on = previous

    return run


class _BlockCircularAutograd:
    """PEFT's block circular convolution y_p = fft(sum_q ifft(x_q) * fft(K_pq)).real, left to autograd."""

    @staticmethod
    def apply(x, kernel):
        m, n, b = kernel.shape
        blocks = x.reshape(*x.shape[:-1], n, b)
        spectrum = torch.einsum("...qb,pqb->...pb", torch.fft.ifft(blocks), torch.fft.fft(kernel))
        return torch.fft.fft(spectrum).real.reshape(*x.shape[:-1], m * b)


c3a_layer.BlockCircularConvolution = _BlockCircularAutograd
c3a_layer.torch = _TorchIn64()
c3a_layer.C3ALinear.forward = _in_double(c3a_layer.C3ALinear.forward, lambda self, x, *a: x.dtype == torch.float64)
c3a_layer.C3ALayer.get_delta_weight = _in_double(
    c3a_layer.C3ALayer.get_delta_weight, lambda self, *a: self.get_base_layer().weight.dtype == torch.float64)

if __name__ == "__main__":
    make_peft_golden.main()
