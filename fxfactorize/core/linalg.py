"""Symmetric eigensolvers and Cholesky on one thread for the matrix sizes a layer gives.

LAPACK's multi-threaded symmetric eigensolver degrades badly when the cores are shared: on the
2-core CI machine with one other busy process, ``eigh`` of a 256×256 covariance took 0.93 s on two
threads and 0.022 s on one (measured). Below :data:`SINGLE_THREAD_LIMIT` these calls run on one
thread, and the caller's thread count is restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["SINGLE_THREAD_LIMIT", "cholesky_ex", "eigh", "eigvalsh", "one_thread_for"]

#: Matrices of at most this size are factorized on one thread.
SINGLE_THREAD_LIMIT = 2048


@contextlib.contextmanager
def one_thread_for(size: int) -> Iterator[None]:
    """Run the block on one thread when ``size`` ≤ :data:`SINGLE_THREAD_LIMIT`.

    >>> with one_thread_for(8):
    ...     torch.get_num_threads()
    1
    """
    threads = torch.get_num_threads()
    if size > SINGLE_THREAD_LIMIT or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` (ascending), on one thread for small matrices.

    >>> eigh(torch.eye(2, dtype=torch.float64))[0].tolist()
    [1.0, 1.0]
    """
    with one_thread_for(matrix.shape[-1]):
        return torch.linalg.eigh(matrix)


def eigvalsh(matrix: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh`` (ascending), on one thread for small matrices.

    >>> eigvalsh(torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))).tolist()
    [1.0, 2.0]
    """
    with one_thread_for(matrix.shape[-1]):
        return torch.linalg.eigvalsh(matrix)


def cholesky_ex(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex``, on one thread for small matrices.

    >>> int(cholesky_ex(torch.eye(3, dtype=torch.float64))[1])
    0
    """
    with one_thread_for(matrix.shape[-1]):
        return torch.linalg.cholesky_ex(matrix)
