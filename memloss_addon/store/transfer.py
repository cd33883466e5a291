"""Host-to-device copies that never make the host wait, and what pinned host memory costs.

Every copy of a host tensor (indices, row positions, received rows) to a batch's device goes
through :func:`to_device`, so that one function decides how it is done and a test can observe
every such copy.

A plain ``cpu_tensor.to(cuda)`` copies from pageable memory and returns only once the copy has
run, that is after all the work already queued on the stream (the attack, the forward pass).
:func:`to_device` copies the tensor into a fresh pinned buffer and issues a non-blocking copy from
it instead: the host goes on at once. This is safe because nobody else holds the pinned buffer:
the caller may change or free its own tensor right after the call, and the buffer itself is freed
when :func:`to_device` returns, but PyTorch's caching host allocator hands its block out again only
after the copy has completed (a ``non_blocking`` copy from pinned memory records an event on the
block, and the allocator checks it before reuse).

The caching host allocator rounds every pinned allocation up to a power of two (unless
``PYTORCH_ALLOC_CONF`` sets ``pinned_max_round_threshold``), and keeps freed blocks locked for
reuse; :func:`pinned_nbytes` is what a buffer of a given size really locks.
"""

from __future__ import annotations

import torch

__all__ = ["pinned_nbytes", "to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``, copied from the host without waiting for the device.

    A host tensor bound for CUDA is staged through a fresh pinned buffer and copied with
    ``non_blocking=True`` on the current stream, so work queued after it on that stream sees the
    values. A CUDA tensor bound for CUDA is copied on the stream, which never makes the host wait.
    Any other move (to the CPU) is a plain ``.to``: a no-op for a host tensor.

    Example:
        >>> rows = torch.tensor([3, 1])
        >>> to_device(rows, torch.device("cpu")) is rows
        True
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    staged.copy_(tensor)
    return staged.to(device, non_blocking=True)


def pinned_nbytes(nbytes: int) -> int:
    """Bytes of pinned host memory a request of ``nbytes`` locks: the next power of two.

    Example:
        >>> pinned_nbytes(614_400_000)  # a float32 CIFAR-10 memory would lock 1 GiB
        1073741824
    """
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()
