"""Counts host-device synchronisations (tensor values read back to the host) under a dispatch mode."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))
