#!/usr/bin/env python3
"""Makes a BOFT golden case: scripts/make_peft_golden.py with PEFT's CUDA block-diagonal kernel
(fbd_cuda) replaced by the same operation in PyTorch.

Without fbd_cuda PEFT 0.21 silently sets boft_n_butterfly_factor to 1 (its CPU path builds one
block-diagonal matrix only), so butterfly factors > 1 can only be generated with the kernel. The
stand-in computes what the kernel computes: input (N, D, H, H) -> N block-diagonal (D H, D H)
matrices, and the backward pass takes the diagonal blocks of the gradient.

Usage: same arguments as make_peft_golden.py.
"""
import os
import sys

import torch

import peft.tuners.boft.layer as boft_layer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_peft_golden  # noqa: E402


class BlockDiagStandIn:
    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*torch.unbind(b)) for b in blocks])]

    @staticmethod
    def backward(grad, blocks):
        n, d, h, _ = blocks.shape
        out = torch.empty_like(blocks, dtype=grad.dtype)
        for j in range(d):
            out[:, j] = grad[:, j * h:(j + 1) * h, j * h:(j + 1) * h]
        return [out]


boft_layer._FBD_CUDA = BlockDiagStandIn()

if __name__ == "__main__":
    make_peft_golden.main()
