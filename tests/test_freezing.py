"""Row-sparse weight gradients and exact optimizer handling."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from neq_hf import RowSparseGradLinear


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("axis_out", [True, False])
def test_row_sparse_grad_matches_dense_on_active_rows(axis_out, transposed):
    torch.manual_seed(0)
    module = Conv1D(6, 5) if transposed else nn.Linear(5, 6)
    x = torch.randn(3, 4, 5, requires_grad=True)
    n_feat = 6 if axis_out else 5
    active = torch.tensor([0, 2, 3] if axis_out else [1, 4])
    dense = module(x)
    g = torch.randn_like(dense)
    gx_dense, gw_dense, gb_dense = torch.autograd.grad(dense, (x, module.weight, module.bias), g)

    y = RowSparseGradLinear.apply(x, module.weight, module.bias, active, axis_out, transposed)
    torch.testing.assert_close(y, dense)
    gx, gw, gb = torch.autograd.grad(y, (x, module.weight, module.bias), g)
    torch.testing.assert_close(gx, gx_dense)
    dim = (1 if transposed else 0) if axis_out else (0 if transposed else 1)
    frozen = torch.tensor([i for i in range(n_feat) if i not in active.tolist()])
    torch.testing.assert_close(gw.index_select(dim, active), gw_dense.index_select(dim, active))
    assert (gw.index_select(dim, frozen) == 0).all()
    if axis_out:
        torch.testing.assert_close(gb[active], gb_dense[active])
        assert (gb[frozen] == 0).all()
    else:
        torch.testing.assert_close(gb, gb_dense)


def test_row_sparse_grad_under_bf16_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    x = torch.randn(2, 3, 8)
    active = torch.tensor([1, 2, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = RowSparseGradLinear.apply(x, lin.weight, lin.bias, active, True, False)
        ref = lin(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32
    assert (lin.weight.grad[[0, 3, 4]] == 0).all() and lin.weight.grad[active].abs().sum() > 0


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("axis_out", [True, False])
def test_dense_mode_zeroes_frozen_rows(axis_out, transposed):
    torch.manual_seed(0)
    module = Conv1D(6, 5) if transposed else nn.Linear(5, 6)
    x = torch.randn(3, 4, 5, requires_grad=True)
    n_feat = 6 if axis_out else 5
    frozen = torch.tensor([1, 4])
    active = torch.tensor([i for i in range(n_feat) if i not in (1, 4)])
    dense = module(x)
    g = torch.randn_like(dense)
    gw_dense = torch.autograd.grad(dense, module.weight, g)[0]
    y = RowSparseGradLinear.apply(x, module.weight, module.bias, active, axis_out, transposed, frozen)
    gw = torch.autograd.grad(y, module.weight, g)[0]
    dim = (1 if transposed else 0) if axis_out else (0 if transposed else 1)
    assert gw.shape == module.weight.shape
    assert (gw.index_select(dim, frozen) == 0).all()
    torch.testing.assert_close(gw.index_select(dim, active), gw_dense.index_select(dim, active))
