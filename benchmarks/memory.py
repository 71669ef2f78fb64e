"""Peak tensor memory on any device, the CPU included: ``TensorMemory``.

``torch.cuda.max_memory_allocated`` has no CPU counterpart, and a process's resident memory
mixes in the allocator's caching and everything else the process holds. Under ``TensorMemory``
every tensor storage an operation creates is counted from its creation until it is freed (a
weak reference to the storage, which PyTorch keeps as long as any tensor uses it); ``peak`` is
the most bytes alive at once: what the block allocated on top of what existed before it, as
``max_memory_allocated`` minus the memory allocated before would report it, minus allocator
rounding. Views and in-place results share their input's storage and add nothing.

It adds Python work to every operation: measure memory and time in separate runs.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage pointer -> bytes, while alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            leaf.untyped_storage().data_ptr()
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor)
        }
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        pointer, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or pointer in inputs or pointer in self._sizes:
            return
        self._sizes[pointer] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, pointer)

    def _free(self, pointer: int) -> None:
        self.live -= self._sizes.pop(pointer, 0)
