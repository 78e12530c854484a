"""Input/output capture of linear layers that bypass module hooks.

torchvision's Swin attention calls ``F.linear`` on ``attn.qkv.weight`` and ``attn.proj.weight``
directly, so forward hooks on those modules never fire. A torch-function mode sees every
``F.linear`` call of the forward it wraps and records (input, output) for the chosen weights:
the forward itself is torchvision's, unchanged, so the gradients are the model's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch.overrides import TorchFunctionMode


class LinearCapture(TorchFunctionMode):
    """``with LinearCapture(weights) as cap: y = block(x)`` → ``cap.io[i] = (X, Y)`` of the last
    ``F.linear`` call on ``weights[i]`` (X detached, Y in the autograd graph)."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self._index = {id(w): i for i, w in enumerate(weights)}
        self.io: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(weights)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is Fn.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            i = self._index.get(id(w))
            if i is not None:
                x = args[0] if args else kwargs["input"]
                self.io[i] = (x.detach(), out)
        return out
