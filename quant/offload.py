"""Run a denoiser larger than the device's memory: its blocks stream through the device one at a time (#23 item 4).

    with streamed(model, blocks, "cuda"):       # blocks: the repeated submodules holding most of the weights
                                                # (stream_blocks(model); stream() / unstream() for longer)
        prepared = engine.prepare(runner, prompts, cfg)     # calibration, sensitivity (its backward recomputes blocks)
        alloc = engine.plan(runner, prepared, cfg)
    qmodel, _ = engine.quantize(model, alloc, prepared.calib, device="cuda")   # layer by layer into the device

Inside the block, everything of `model` outside `blocks` (embedders, norms, the final layer) sits on the device;
each block's parameters and buffers are copied there just before it runs and dropped right after (the CPU tensors are
kept, so nothing is copied back). The device then holds one block's weights and the activations, never the model.
Forward passes only (no_grad), or backward passes inside `recomputed(model)` (each block a checkpointed region,
recomputed in the backward: autograd would otherwise keep every block's device weights alive until then). Layers
called on their own while streamed (the sensitivity scores a layer on its recorded inputs) take their weights to
the inputs' device themselves (apply.with_params_on). On exit every tensor is back where it was.
"""
from __future__ import annotations

import contextlib
import copy
import weakref

import torch
import torch.nn as nn


def _tensors(m: nn.Module):
    for mod in m.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in store.items():
                if v is not None:
                    yield store, k, v


_STREAMS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()  # model -> its stream's state
_BLOCKS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()  # streamed block -> its onloaded
# tensors' homes while it runs ([] between calls)


def stream_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that hold most of a denoiser's weights: every item of its top-level ModuleLists (Flux's
    transformer_blocks and single_transformer_blocks, SD3's transformer_blocks, a UNet's down / up blocks, ComfyUI's
    double / single blocks)."""
    return [b for child in model.children() if isinstance(child, nn.ModuleList) for b in child]


def stream(model: nn.Module, blocks, device) -> None:
    """Stream `model`'s blocks through `device` from now on (until `unstream`): see the module doc. Each block's
    tensors that are not on the device are found at each call (a layer swapped in since streams too); the hooks act
    only on the blocks given here: a copy of the model (deepcopy copies the hooks) runs as it is."""
    if model in _STREAMS:
        raise RuntimeError("this model is streamed already")
    device = torch.device(device)
    blocks = list(blocks)
    inside = {id(v) for b in blocks for _, _, v in _tensors(b)}
    moved, handles = [], []  # (store, key, original tensor) of everything outside the blocks
    with torch.no_grad():
        for store, k, v in _tensors(model):
            if id(v) not in inside and v.device != device:
                moved.append((store, k, v))
                store[k] = _moved(v, device)

    def pre(block, args):  # (the tensors found now: a layer swapped into the block since streams too)
        if block not in _BLOCKS:
            return
        homes = [(st, k, v) for st, k, v in _tensors(block) if v.device != device]
        with torch.no_grad():
            for st, k, v in homes:
                st[k] = _moved(v, device, non_blocking=True)
        _BLOCKS[block] = homes

    def post(block, args, out):
        _offload(block)

    for b in blocks:
        _BLOCKS[b] = []
        handles += [b.register_forward_pre_hook(pre), b.register_forward_hook(post)]
    _STREAMS[model] = {"device": device, "blocks": blocks, "moved": moved, "handles": handles}


def _offload(block: nn.Module) -> None:
    """The block's tensors back to their homes (nothing when it holds none onloaded)."""
    for st, k, v in _BLOCKS.get(block, ()):
        st[k] = v
    if block in _BLOCKS:
        _BLOCKS[block] = []


def unstream(model: nn.Module) -> None:
    """Every tensor back where it was, the hooks removed (nothing when `model` is not streamed)."""
    st = _STREAMS.pop(model, None)
    if st is None:
        return
    for h in st["handles"]:
        h.remove()
    for b in st["blocks"]:
        for store, k, v in _BLOCKS.pop(b, []):
            store[k] = v
    for store, k, v in st["moved"]:
        store[k] = v


def streamed_device(model: nn.Module) -> torch.device | None:
    """The device `model` is streamed through, or None."""
    st = _STREAMS.get(model) if isinstance(model, nn.Module) else None
    return None if st is None else st["device"]


@contextlib.contextmanager
def streamed(model: nn.Module, blocks, device):
    stream(model, blocks, device)
    try:
        yield model
    finally:
        unstream(model)


_RECOMPUTING = [0]  # blocks being recomputed now


class _Recomputing:  # (one object per block call, entered at each backward pass that recomputes the block)
    def __enter__(self):
        _RECOMPUTING[0] += 1

    def __exit__(self, *exc):
        _RECOMPUTING[0] -= 1


def recomputing() -> bool:
    """True while a backward pass recomputes a block (`recomputed`): forward hooks that record must not record
    twice."""
    return _RECOMPUTING[0] > 0


def checkpoint_units(model: nn.Module, parts: int = 16) -> list[nn.Module]:
    """Where a backward pass through `model` recomputes rather than keeps what autograd saves: the largest submodules
    holding at most 1/`parts` of its parameters, none inside another (a transformer's blocks, a UNet's ResNet blocks
    and transformer layers), without the containers (a ModuleList is never called), single layers (a Linear run in
    a region would keep its input where outside it keeps only its weight) and small ones (under 1/64 of that: they
    save little)."""
    size = {}

    def count(m):  # (parameters under each module, shared ones once per module)
        size[m] = sum(p.numel() for p in m.parameters())
        for c in m.children():
            if c not in size:
                count(c)

    count(model)
    cap = size[model] / parts
    units = []

    def walk(m):
        for c in m.children():
            if isinstance(c, (nn.ModuleList, nn.ModuleDict)) or size[c] > cap:
                walk(c)
            elif size[c] >= cap / 64 and next(c.children(), None) is not None and c not in units:
                units.append(c)

    walk(model)
    return units


@contextlib.contextmanager
def recomputed(model: nn.Module):
    """Inside, a backward pass through `model` holds one block's saved tensors at a time: each block runs as a
    torch.utils.checkpoint region, so its forward keeps only the block's inputs of what autograd would save, and the
    backward recomputes the block when it reaches it. The blocks: a streamed model's streamed blocks (their weights'
    device copies were among what autograd saved: they would all stay on the device until the backward; a
    recomputation onloads them again), else `checkpoint_units` (the activations a backward through a UNet at
    1024 px keeps are several times its weights). Forward hooks of a block's layers run again when it is recomputed,
    with `recomputing()` true."""
    from torch.utils.checkpoint import checkpoint

    st = _STREAMS.get(model)
    blocks = st["blocks"] if st else checkpoint_units(model)

    def contexts():
        return contextlib.nullcontext(), _Recomputing()

    def checkpointed(block):
        call = block._call_impl  # (the class's: a streamed block's hooks run inside the region, at each recomputation)

        def run(*args, **kwargs):
            try:
                return call(*args, **kwargs)
            finally:  # (a recomputation stops once it has what the backward needs, before the block's post hook)
                _offload(block)

        def region(*args, **kwargs):  # (torch saves its positional tensor arguments: an inference tensor cannot be)
            args = [a.clone() if isinstance(a, torch.Tensor) and a.is_inference() else a for a in args]
            return checkpoint(run, *args, use_reentrant=False, context_fn=contexts, **kwargs)

        return region

    for b in blocks:
        b._call_impl = checkpointed(b)
    try:
        yield model
    finally:
        for b in blocks:
            b.__dict__.pop("_call_impl", None)


def fits(device, nbytes: int, headroom: float = 0.2) -> bool:
    """Do `nbytes` of weights fit the device's free memory, leaving `headroom` of its total for activations and the
    rest of the pipeline? (Always on a CPU.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    return nbytes + headroom * total <= free


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
