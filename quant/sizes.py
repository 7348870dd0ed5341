"""Bytes of models and tensors, the one family of counters every host uses: real storage (what a tensor occupies
now), the FP16 size a denoiser has as shipped, and the bytes of a quantized denoiser as deployed."""
from __future__ import annotations

import torch.nn as nn

# buffers of a quantized layer that stay fp32 when deployed (activation ranges, BOS vectors, balancing vectors)
RANGE_BUFFERS = ("input_scale", "input_zero", "bos_in", "bos_out", "smooth")


def tensor_bytes(tensors) -> int:
    """Real bytes of the distinct storages behind `tensors` (shared storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.device.type) if st.data_ptr() else id(st)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def model_bytes(model: nn.Module) -> int:
    """Real bytes of a module's parameters and buffers as they are held now."""
    return tensor_bytes(model.state_dict(keep_vars=True).values())


def fp16_bytes(model: nn.Module) -> int:
    """The module's size with every float tensor in fp16 (how checkpoints ship; the baseline of every ratio)."""
    return sum(t.numel() * 2 if t.is_floating_point() else t.numel() * t.element_size()
               for t in model.state_dict().values())


def deploy_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as deployed: packed blobs as stored, float weights/biases in fp16,
    activation ranges and BOS vectors in fp32."""
    total = 0
    for k, t in model.state_dict().items():
        if t.is_floating_point() and not k.endswith(RANGE_BUFFERS):
            total += t.numel() * 2
        else:
            total += t.numel() * t.element_size()
    return total
