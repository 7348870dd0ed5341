"""Activation quantization fused into the op that produces the activation, in eager mode (#22 item 3).

A quantized layer with int8 activations quantizes its input before its GEMM: one more pass over a tensor that the
op before it has just written. Where that op is a LayerNorm, or the GELU / GEGLU of a feed-forward (diffusers' GELU /
GEGLU modules: a projection, then the activation), and every quantized layer reading its output quantizes it the
same way (to_q / to_k / to_v after a transformer block's norm; ff.net.2 after ff.net.0; an nn.GELU between two
Linear layers), the op runs as one fused Triton kernel (kernels/triton_fused.py) that writes both its output and the
int8 codes; the layers' GEMMs read the codes (the Triton route; dispatch passes them on) and skip their own
quantization pass. In a UNet ResBlock (diffusers' ResnetBlock2D: norm -> nonlinearity [-> dropout] -> conv;
ComfyUI's ResBlock: in_layers / out_layers = GroupNorm, SiLU[, Dropout], conv) the GroupNorm computes GroupNorm + SiLU
and the static codes of its output padded for the 3x3 conv in one kernel; the SiLU module that follows (in diffusers
shared within the block, also for the time embedding) passes a tensor so marked through unchanged and applies itself
to anything else. Not yet: a speed figure (a GPU run).

`enable(model)` (quantize_model and the file loader call it): at the model's first call, which runs as before,
hooks see which module's output each quantized layer reads; after it, each producer whose readers agree (same
activation mode, bits and calibrated range, no balancing, no BOS split) gets a fused forward. The fused forward runs
only where it can (a Triton device, not under torch.compile or autograd, the readers' current range), else the
module's own forward; the codes ride on the output tensor and a reader takes them only if it belongs to that
producer's group and the tensor is unchanged since (its version). MIXQUANT_FUSE=0 turns it off.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import weakref

import torch
import torch.nn as nn

from .layers import CODES_ATTR, QuantConv2d, QuantLayer


def _plain(m: nn.Module, base: type) -> bool:
    """`m` computes what `base` does: its class does not override forward, or it is ComfyUI's (whose forward only
    adds the per-call weight casting that the fused forward leaves to it: comfy_cast_weights)."""
    return type(m).forward is base.forward or hasattr(m, "comfy_cast_weights")


def _kind(m: nn.Module) -> str | None:
    """The fusable producers: a LayerNorm, an nn.GELU, or a feed-forward's GELU / GEGLU module as diffusers and
    ComfyUI write them (a `proj` Linear and then the activation). A subclass that computes something else (another
    host's own forward) is left alone."""
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and _plain(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, nn.GELU) and _plain(m, nn.GELU):  # (ComfyUI's Flux MLP: Linear, GELU(tanh), Linear)
        return "gelu_module"
    name = type(m).__name__
    if name in ("GELU", "GEGLU") and isinstance(getattr(m, "proj", None), nn.Module) \
            and type(m).__module__.split(".")[0] in ("diffusers", "comfy"):
        return name.lower()
    return None


def _resblock_norms(model: nn.Module) -> set:
    """The GroupNorms whose output only a SiLU reads: norm1 / norm2 of diffusers' ResnetBlock2D, the first module of
    ComfyUI's ResBlock in_layers / out_layers."""
    out = set()
    for m in model.modules():
        name, lib = type(m).__name__, type(m).__module__.split(".")[0]
        if name == "ResnetBlock2D" and lib == "diffusers":
            out.update(n for n in (getattr(m, "norm1", None), getattr(m, "norm2", None)) if n is not None)
        elif name == "ResBlock" and lib == "comfy":
            for seq in (getattr(m, "in_layers", None), getattr(m, "out_layers", None)):
                if isinstance(seq, nn.Sequential) and len(seq) > 1 and isinstance(seq[1], nn.SiLU):
                    out.add(seq[0])
    return {n for n in out if isinstance(n, nn.GroupNorm) and n.affine and _plain(n, nn.GroupNorm)}


def _reader_key(q: QuantLayer):
    """How a reader quantizes its input, or None where a fused producer cannot write it: int8 codes of x itself."""
    f = q.fmt
    if f.a_bits > 8 or f.fp8 or q.smooth is not None or getattr(q, "bos_out", None) is not None \
            or q.a_split is not None or f.w_bits >= 16:
        return None
    if f.a_mode == "dynamic":
        return ("dynamic", f.a_bits)
    if q.input_scale is None:
        return None
    return ("static", f.a_bits, q.input_scale.detach().cpu(), q.input_zero.detach().cpu())


def _same(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


class Group:
    """One producer and the quantized layers that read its output (kept on the producer: a deep copy of the model
    copies it with its readers)."""

    def __init__(self, kind: str, readers: list):
        self.kind, self.readers = kind, readers
        self.used = 0  # fused calls (tests, bench)


def _usable(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        return False
    from ..kernels import triton_gemm
    return triton_gemm.HAVE_TRITON and triton_gemm.available(x.device) is None


ACTIVATED_ATTR = "_mq_activated"  # (group, version): SiLU already applied by a fused GroupNorm


def _passthrough_forward(self, x, *args, **kwargs):
    """A SiLU after a fused GroupNorm: its output (marked, unchanged since) is activated already."""
    tag = getattr(x, ACTIVATED_ATTR, None) if isinstance(x, torch.Tensor) else None
    if tag is not None and x._version == tag[1] and not args and not kwargs:
        return x
    return super(type(self), self).forward(x, *args, **kwargs)


def _fused_forward(self, x, *args, **kwargs):
    """The producer's forward, writing its readers' int8 codes beside its output where it can (module docstring)."""
    g = self.__dict__.get("_mq_group")
    if g is None or args or kwargs or not isinstance(x, torch.Tensor) or not _usable(x) \
            or getattr(self, "comfy_cast_weights", False) \
            or any(p.device != x.device for p in self._parameters.values() if p is not None):
        # (a host that casts or moves weights per call, as ComfyUI's low-VRAM mode does: its own forward)
        return super(type(self), self).forward(x, *args, **kwargs)
    act = g.readers[0]._act_args(x.device)
    kw = dict(a_mode=act["a_mode"], a_bits=act["a_bits"], a_scale=act["a_scale"], a_zero=act["a_zero"])
    try:
        with _counted_outputs():
            y, q, s = _fused_outputs(self, g, x, kw)
        if y is None:
            return super(type(self), self).forward(x)
        if g.kind == "groupnorm_silu":
            setattr(y, ACTIVATED_ATTR, (g, y._version))
    except Exception as e:  # noqa: BLE001  (a kernel this GPU / Triton cannot build: the module's own forward)
        del self.__dict__["_mq_group"]
        warnings.warn(f"MixQuant: the fused {g.kind} + quantization kernel failed here ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''}); that layer runs unfused (MIXQUANT_FUSE=0 "
                      "turns fusion off everywhere).", stacklevel=2)
        return super(type(self), self).forward(x, *args, **kwargs)
    setattr(y, CODES_ATTR, (g, y._version, (q, s)))
    g.used += 1
    return y


def _counted_outputs():
    """A reader takes the codes only while the tagged output is unchanged, by its version counter. Under
    torch.inference_mode (ComfyUI runs every node in it) a tensor made there is an inference tensor, which has no
    version counter (reading it raises); the fused op runs outside inference mode (grad still off), so its output is
    a normal tensor, whose in-place writes are counted in inference mode too."""
    if not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _fused_outputs(self, g: Group, x: torch.Tensor, kw: dict):
    """(output, its readers' int8 codes, row scales) of the producer's fused kernel; (None, None, None) where the
    kernel does not take this input."""
    from ..kernels import triton_fused as tf

    if g.kind == "groupnorm_silu":
        if x.dim() != 4:
            return None, None, None
        return tf.groupnorm_silu_quant(x, self.num_groups, self.weight, self.bias, self.eps, kw["a_scale"],
                                       kw["a_zero"], kw["a_bits"], pad=tuple(g.readers[0].padding))
    if g.kind == "layernorm":
        return tf.layernorm_quant(x, self.weight, self.bias, self.eps, **kw)
    if g.kind == "gelu_module":
        return tf.gelu_quant(x, approximate=self.approximate, **kw)
    h = self.proj(x)
    if g.kind == "geglu":
        a, gate = h.chunk(2, dim=-1)
        return tf.gelu_quant(a, gate=gate, **kw)
    return tf.gelu_quant(h, approximate=getattr(self, "approximate", "none"), **kw)


_CLASSES: dict = {}


def _fused_class(cls: type, forward=_fused_forward) -> type:
    """`cls` with the fused forward (one subclass per producer class; the module keeps its state, only its class
    changes, so copies and device moves behave as before)."""
    if (cls, forward) not in _CLASSES:
        _CLASSES[cls, forward] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _CLASSES[cls, forward]


def _link(mod, args, kwargs):
    """Before the first call: hooks that see which producer's output each quantized layer reads."""
    st = mod.__dict__.get("_mq_fusion")
    if st is None or st.get("done") or "trace" in st:
        return
    made, links = {}, {}  # id(output) -> (weak reference, producer, kind); producer -> (kind, its readers)
    silu_of = {}  # fused GroupNorm -> the SiLU module applied to its output

    def out_hook(kind):
        def h(m, a, out):
            if isinstance(out, torch.Tensor):
                made[id(out)] = (weakref.ref(out), m, kind)
        return h

    def through(m, a, out):  # SiLU after a ResBlock's GroupNorm, and the dropout after it: the same producer
        hit = made.get(id(a[0])) if a and isinstance(a[0], torch.Tensor) else None
        if hit is None or hit[0]() is not a[0] or not isinstance(out, torch.Tensor):
            return
        if isinstance(m, nn.SiLU) and hit[2] == "groupnorm":
            silu_of.setdefault(hit[1], set()).add(m)
            made[id(out)] = (weakref.ref(out), hit[1], "groupnorm_silu")
        elif isinstance(m, nn.Dropout) and hit[2] == "groupnorm_silu":
            made[id(out)] = (weakref.ref(out), hit[1], "groupnorm_silu")

    def in_hook(m, a):
        if a and isinstance(a[0], torch.Tensor):
            hit = made.get(id(a[0]))
            if hit is not None and hit[0]() is a[0]:  # (that very tensor, alive: an id is not reused while it is)
                links.setdefault(hit[1], (hit[2], []))[1].append(m)

    hs = []
    norms = _resblock_norms(mod)
    for m in mod.modules():
        kind = "groupnorm" if m in norms else _kind(m)
        if kind is not None:
            hs.append(m.register_forward_hook(out_hook(kind)))
        if isinstance(m, (nn.SiLU, nn.Dropout)):
            hs.append(m.register_forward_hook(through))
        if isinstance(m, QuantLayer):
            hs.append(m.register_forward_pre_hook(in_hook))
    st["trace"] = (hs, links, silu_of)


def _install(mod, args, kwargs, out):
    """After the first call: each producer whose readers agree gets the fused forward."""
    st = mod.__dict__.get("_mq_fusion")
    if st is None or st.get("done") or "trace" not in st:
        return
    hs, links, silu_of = st.pop("trace")
    for h in hs:
        h.remove()
    for m, (kind, readers) in links.items():
        if "_mq_group" in m.__dict__ or kind == "groupnorm":  # (a GroupNorm read without its SiLU: no kernel)
            continue
        readers = list(dict.fromkeys(readers))
        keys = [_reader_key(r) for r in readers]
        if keys[0] is None or not all(_same(keys[0], k) for k in keys[1:]):
            continue
        if kind == "groupnorm_silu":  # static codes of the input padded as the convs pad it
            if keys[0][0] != "static" or not all(isinstance(r, QuantConv2d) and tuple(r.padding) ==
                                                 tuple(readers[0].padding) for r in readers):
                continue
            for silu in silu_of.get(m, ()):
                if type(silu).forward is not _passthrough_forward:
                    silu.__class__ = _fused_class(type(silu), _passthrough_forward)
        m._mq_group = Group(kind, readers)
        m.__class__ = _fused_class(type(m))
    st["done"] = True


def enable(model: nn.Module) -> None:
    """Fuse activation quantization into the producers of `model`'s quantized layers, from its first call on (module
    docstring). Idempotent."""
    if os.environ.get("MIXQUANT_FUSE", "1") == "0" or "_mq_fusion" in model.__dict__:
        return
    if not any(isinstance(m, QuantLayer) for m in model.modules()):
        return
    model._mq_fusion = {}
    model.register_forward_pre_hook(_link, with_kwargs=True)
    model.register_forward_hook(_install, with_kwargs=True)


def groups(model: nn.Module) -> list:
    """The fused producer groups of `model` (after its first call)."""
    return [m._mq_group for m in model.modules() if "_mq_group" in m.__dict__]
