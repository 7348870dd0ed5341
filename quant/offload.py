"""Run a denoiser larger than the device's memory: its blocks stream through the device one at a time (#23 item 4).

    with streamed(model, blocks, "cuda"):       # blocks: the repeated submodules holding most of the weights
        prepared = engine.prepare(runner, prompts, cfg)     # calibration, sensitivity: forward passes only
        alloc = engine.plan(runner, prepared, cfg)
    qmodel, _ = engine.quantize(model, alloc, prepared.calib, device="cuda")   # layer by layer into the device

Inside the block, everything of `model` outside `blocks` (embedders, norms, the final layer) sits on the device;
each block's parameters and buffers are copied there just before it runs and dropped right after (the CPU tensors are
kept, so nothing is copied back). The device then holds one block's weights and the activations, never the model.
Forward passes only (no_grad): autograd would keep every block's device weights alive until its backward. Layers
called on their own while streamed (the sensitivity scores a layer on its recorded inputs) take their weights to
the inputs' device themselves (apply.with_params_on). On exit every tensor is back where it was.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn


def _tensors(m: nn.Module):
    for mod in m.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in store.items():
                if v is not None:
                    yield store, k, v


@contextlib.contextmanager
def streamed(model: nn.Module, blocks, device):
    device = torch.device(device)
    blocks = list(blocks)
    inside = {id(v) for b in blocks for _, _, v in _tensors(b)}
    moved = []  # (store, key, original tensor) of everything outside the blocks
    handles = []
    try:
        with torch.no_grad():
            for store, k, v in _tensors(model):
                if id(v) not in inside and v.device != device:
                    moved.append((store, k, v))
                    store[k] = _moved(v, device)

        def pre(block, args):
            with torch.no_grad():
                for store, k, v in block.__dict__["_mq_home"]:
                    store[k] = _moved(v, device, non_blocking=True)

        def post(block, args, out):
            for store, k, v in block.__dict__["_mq_home"]:
                store[k] = v

        for b in blocks:
            b.__dict__["_mq_home"] = [(s, k, v) for s, k, v in _tensors(b) if v.device != device]
            handles += [b.register_forward_pre_hook(pre), b.register_forward_hook(post)]
        yield model
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            for store, k, v in b.__dict__.pop("_mq_home", []):
                store[k] = v
        for store, k, v in moved:
            store[k] = v


def _moved(t: torch.Tensor, device, non_blocking: bool = False) -> torch.Tensor:
    """t's values on `device`, a Parameter where t is one (t itself when it is there already)."""
    new = t.detach().to(device, non_blocking=non_blocking)
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def with_params_on(src: nn.Module, device) -> nn.Module:
    """`src` (a Linear / Conv2d) with its parameters and buffers on `device`: a shallow copy holding moved tensors,
    `src` itself untouched (src when they are there already). For a layer whose weights are elsewhere than where it
    computes: quantized into a device layer by layer (apply.quantize_model), scored while streamed (sensitivity)."""
    device = torch.device(device)
    if all(t.device == device for t in (*src.parameters(), *src.buffers())):
        return src
    tmp = copy.copy(src)
    tmp._parameters = {k: None if v is None else _moved(v, device) for k, v in src._parameters.items()}
    tmp._buffers = {k: None if v is None else _moved(v, device) for k, v in src._buffers.items()}
    return tmp
