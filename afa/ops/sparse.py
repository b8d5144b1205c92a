"""Building the block-diagonal CSR matrices that PAR and the random walk multiply with."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

# Beta-status and "invariant checks disabled" notices say nothing about these matrices,
# whose indices are built in range by construction.
_NOTICES = ("Sparse CSR tensor support is in beta", "Sparse invariant checks are implicitly disabled")


def fixed_width_csr(columns: Tensor, values: Tensor, size: int) -> Tensor:
    """A square CSR matrix with the same number of entries in every row.

    Args:
        columns: (rows · width,) column index of every entry, row by row (int32 or int64).
        values: (rows · width,) float values in the same order.
        size: rows and columns of the matrix.

    Returns:
        (size, size) sparse CSR tensor; duplicate columns within a row add up in products.
    """
    width = values.numel() // size
    row_starts = torch.arange(0, values.numel() + 1, width, device=values.device, dtype=columns.dtype)
    with warnings.catch_warnings():
        for notice in _NOTICES:
            warnings.filterwarnings("ignore", message=notice)
        return torch.sparse_csr_tensor(row_starts, columns, values, size=(size, size), check_invariants=False)


def index_dtype_for(entries: int) -> torch.dtype:
    """int32 indices halve the index traffic of a sparse product; int64 only when needed."""
    return torch.int32 if entries < 2**31 - 1 else torch.int64
