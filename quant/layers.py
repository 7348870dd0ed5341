"""Quantized drop-in layers: QuantLinear and QuantConv2d.

Storage ("packed" mode): `weight` is ONE uint8 tensor [N, row_bytes] holding, per output channel, the packed codes,
fp16 scales and uint8 zero points side by side (kernels/packing.py). The FP weight is not kept. Keeping everything
in `weight` means ComfyUI's LoRA backup/restore and low-VRAM moves, which only know `module.weight`, can never
separate codes from their scales.

"simulate" mode keeps the FP weight and uses the dequantized weight computed from exactly the codes and scales the
packed mode would store, so both modes give bit-identical outputs (on the reference path); it lets sensitivity
measurement switch formats without repacking anything else.

Activations: 16-bit (weight-only), static (calibrated asymmetric per-tensor range; one row of ranges per group of
timesteps, selected by `act_group`; optionally two channel segments split at `a_split`), or dynamic (per token).
fp8 formats (LayerFormat.fp8) hold float8 e4m3 codes in the same rows and quantize their activations to e4m3, with a
symmetric calibrated scale (input_scale = absmax / 448, input_zero = 0) or per token (kernels/fp8.py).

Channel balancing (SmoothQuant / ViDiT-Q; `smooth`, fp32 [C_in]): where a layer's input has outlier channels, the
input is divided by s per channel before it is quantized and the weight's input columns are multiplied by s before
they are (y = (x / s) (W s)^T = x W^T), moving the outliers' range from the activations into the weights. The
weight this layer stores and computes with is W s; `convert_weight` / `set_weight` (LoRA) speak the float W.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import dispatch, fp8, reference
from ..kernels.cache import fingerprint, version_of
from ..kernels.packing import join_rows, row_layout, split_rows
from .formats import LayerFormat
from .quantizer import qrange, quantize_weight


def _checksum(w: torch.Tensor) -> int:
    """Identify a weight's contents (which precomputed BOS output belongs to it)."""
    flat = w.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.to(torch.int64)
    pos = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=flat.dtype) % 1009
    return hash((int(flat.sum()), int((flat * pos).sum()))) if not flat.is_floating_point() else \
        hash((float(flat.sum()), float((flat * pos).sum())))


class CountedParameter(nn.Parameter):
    """A Parameter that counts writes through `.data`. On a plain Parameter `p.data` is a fresh alias with a version
    counter of its own, so `p.data.copy_(w)` (ComfyUI's copy_to_param, which swaps hook-scheduled LoRA weights in
    and out) changes the values without a trace in `p._version`; every per-layer cache keyed on the weight (prepacked
    int8 copies, Triton weight sums, the BOS-output memo) would then serve the old weight's data. On the CPU a content
    fingerprint caught it; on a GPU reading the tensor would synchronize. Here `.data` is `detach()` (the same storage
    and, for a normal tensor, the same counter) and every `.data` access or assignment also bumps `_mq_writes`, which
    the layer's `weight_epoch()` reports: that also covers inference tensors (no version counter at all; ComfyUI runs
    every node under torch.inference_mode)."""

    @property
    def data(self):
        _touch(self)
        return self.detach()

    @data.setter
    def data(self, value):  # (`module.to(...)` assigns through here: the subclass stays)
        torch.Tensor.data.__set__(self, value)
        _touch(self)

    def detach(self):
        # a CountedParameter too (same storage, same counter): `nn.Parameter(w)` on one, as ComfyUI's set_attr_param
        # does with a backed-up weight, requires that detach() keeps the type of a Parameter subclass
        return torch.Tensor._make_subclass(CountedParameter, torch.Tensor.detach(self), False)

    def __reduce_ex__(self, proto):  # torch.save: a plain Parameter (Parameter's own reduce pickles `.data`: itself)
        return torch._utils._rebuild_parameter, (torch.Tensor.detach(self), self.requires_grad, OrderedDict())


# quant/fusion.py: a producer fused with its readers' activation quantization tags its output with
# (group, the output's version, (int8 codes, row scales)); a reader in the group takes the codes (`fused_codes`)
CODES_ATTR = "_mq_codes"


def fused_codes(layer: "QuantLayer", x: torch.Tensor):
    """The int8 codes (and row scales) of `x` that its producer wrote for `layer` (quant/fusion.py), or None."""
    if torch.compiler.is_compiling():
        return None
    tag = getattr(x, CODES_ATTR, None)
    if tag is None or layer not in tag[0].readers or x._version != tag[1]:
        return None
    return tag[2]


def _touch(p: torch.Tensor) -> None:
    p._mq_writes = getattr(p, "_mq_writes", 0) + 1


# per-layer memos of tensors and calls derived from this layer's own (a deep copy builds its own)
_TRANSIENT = ("_bound_memo", "_act_memo", "_bos_memo")


class QuantLayer(nn.Module):
    """Common storage and hooks; subclasses say how a float weight maps to the [N, K] matrix and how to compute."""

    fmt: LayerFormat
    # ComfyUI's low-VRAM protocol: a layer that is not fully loaded gets its LoRA patches as weight_function /
    # bias_function (LowVramPatch: convert_weight -> LoRA -> set_weight(return_weight=True)), applied per forward.
    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []

    def __setattr__(self, name, value):
        # every weight this layer holds counts writes through `.data` (CountedParameter), including one ComfyUI sets
        # (set_attr_param wraps its tensor in a plain nn.Parameter); same storage, no copy. A new weight is a new
        # epoch: its storage may sit at a freed weight's address with the same version (a caching allocator reuses
        # a block of the same size), which a (data pointer, version) key alone would take for the old weight
        if name == "weight" and isinstance(value, nn.Parameter):
            if not isinstance(value, CountedParameter):
                value = CountedParameter(value.detach(), requires_grad=value.requires_grad)
            for k, v in self.__dict__.get("_weight_attrs", {}).items():
                setattr(value, k, v)
            self._new_weight_epoch()
        super().__setattr__(name, value)

    def set_weight_attrs(self, **attrs) -> None:
        """Attributes that every weight this layer holds carries, now and after any replacement (a LoRA merge, a
        restore from a host's backup, a device move). A host's own protocol reads them off the weight: WebUI Forge's
        LoRA loader dequantizes / requantizes a weight that has a `gguf_cls` (webui/forge.py)."""
        self.__dict__.setdefault("_weight_attrs", {}).update(attrs)
        w = self._parameters.get("weight")
        if w is not None:
            for k, v in attrs.items():
                setattr(w, k, v)

    def _new_weight_epoch(self) -> None:
        self.__dict__["_weight_epoch"] = self.__dict__.get("_weight_epoch", 0) + 1
        self.__dict__.pop("_bound_memo", None)  # (it holds views of the old weight: let its storage go now)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_bound_memo", None)  # (a device move: the bound call holds views of the weight it moves)
        out = super()._apply(fn, recurse)
        w = self._parameters.get("weight")
        if w is not None and not isinstance(w, CountedParameter):  # a move that replaced the Parameter object
            self.weight = w
        return out

    def __getstate__(self):
        # (a copy computes with its own weight: the memos holding this one's tensors and calls are not copied)
        return {k: v for k, v in super().__getstate__().items() if k not in _TRANSIENT}

    def weight_epoch(self) -> tuple:
        """Changes whenever the weight may have changed where its data pointer and version counter do not show it:
        a new Parameter, a write through `.data`, an in-place write into an inference tensor. Kernel caches and
        memos key on it as well (`dispatch`: cache["epoch"])."""
        return self.__dict__.get("_weight_epoch", 0), getattr(self.weight, "_mq_writes", 0)

    def _setup(self, n: int, k: int, fmt: LayerFormat, mode: str):
        if mode not in ("packed", "simulate"):
            raise ValueError("mode must be 'packed' or 'simulate'")
        self.n, self.k, self.fmt, self.mode = n, k, fmt, mode
        self.act_group = 0
        self.a_split: int | None = None
        self._w_hat: torch.Tensor | None = None  # simulate mode: dequantized weight cache
        self.search = "auto"  # simulate mode: the weight range search its lazily quantized weight uses
        self._kernel_cache: dict = {}  # kernel backends keep per-layer prepared data here (keyed by weight version)
        self.register_buffer("input_scale", None)
        self.register_buffer("input_zero", None)
        self.register_buffer("bos_in", None)  # BOS-aware cross-attention (MixDQ): the context's token-0 embedding
        self.register_buffer("bos_out", None)  # and W·e_BOS + b computed in full precision
        self.register_buffer("smooth", None)  # channel balancing: per input channel, x / s and W s (see above)

    # --- weight storage --------------------------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return 1 if self.fmt.group_size is None else -(-self.k // self.fmt.group_size)

    @property
    def packed(self) -> bool:
        return self.mode == "packed" and self.fmt.w_bits < 16

    def _pack(self, w_float: torch.Tensor, search: str = "auto") -> torch.Tensor:
        """The stored blob of a float weight W (the layer's own shape): W s when balanced."""
        w2d = self._to_2d(w_float.detach().float())
        if self.smooth is not None:
            w2d = w2d * self._smooth_columns(w2d.device)
        pw = quantize_weight(w2d, self.fmt.w_bits, self.fmt.group_size, self.fmt.symmetric, search, self.fmt.w_fp8)
        return join_rows(pw.qweight, pw.scale, pw.zero)

    def _smooth_columns(self, device) -> torch.Tensor:
        """s per column of the [N, K] weight matrix (a conv's K is kh x kw x C_in, the channel innermost:
        reference.conv_weight_to_2d)."""
        s = self.smooth.to(device=device, dtype=torch.float32)
        return s.repeat(self.k // s.numel())

    def set_smooth(self, s: torch.Tensor | None) -> None:
        """Balance the input channels by `s` (> 0, one per input channel); set before the weight is packed (from_float
        does) — a stored weight is already W s."""
        if s is None:
            self.smooth = None
            return
        s = torch.as_tensor(s, dtype=torch.float32).reshape(-1)
        cin = self.in_features if isinstance(self, QuantLinear) else self.in_channels
        if s.numel() != cin or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError(f"a balancing vector needs {cin} finite positive values")
        self.smooth = s.to(self.weight.device)
        self._w_hat = None

    def _balance(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if self.smooth is None:
            return x
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return x / self.smooth.to(device=x.device, dtype=x.dtype).reshape(shape)

    def packed_parts(self, blob: torch.Tensor | None = None):
        """(codes, scale fp16 [N, G], zero uint8 [N, G] | None) views into the weight blob."""
        blob = self.weight if blob is None else blob
        return split_rows(blob, self.k, self.fmt.w_bits, self.groups, not self.fmt.symmetric, self.fmt.w_fp8)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, as fp32 [N, K] (balanced: W s, for the balanced input x / s)."""
        if self.fmt.w_bits == 16:
            w = self._to_2d(self.weight.float())
            return w if self.smooth is None else w * self._smooth_columns(w.device)
        if self.mode == "simulate":
            if self._w_hat is None or self._w_hat.device != self.weight.device:
                self._w_hat = self._blob_to_2d(self._pack(self.weight, self.search))
            return self._w_hat
        return self._blob_to_2d(self.weight)

    def unbalanced_weight(self) -> torch.Tensor:
        """The float weight W this layer stands for, fp32 [N, K] (its dequantized weight, with any balancing undone):
        what a format without balancing (an export) starts from."""
        return self._unbalance(self.dequantized_weight())

    def _unbalance(self, w2d: torch.Tensor) -> torch.Tensor:
        """W from the stored W s ([N, K])."""
        return w2d if self.smooth is None else w2d / self._smooth_columns(w2d.device)

    def _blob_to_2d(self, blob: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = self.packed_parts(blob)
        return reference.dequantize_weight(codes, scale, zero, self.fmt.w_bits, self.k, self.fmt.group_size)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    # --- activations -----------------------------------------------------------------------------------------------
    def set_act_range(self, lo: torch.Tensor, hi: torch.Tensor, split: int | None = None):
        """Static activation range(s): lo/hi of shape [T, S] (T timestep groups, S = 2 when split)."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1, 1 if split is None else 2)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(lo.shape)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError("activation range is not finite")
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        if self.fmt.a_fp8:  # symmetric e4m3: absmax / 448, no zero point
            scale = fp8.static_scale(lo, hi)
            zero = torch.zeros_like(scale)
        else:
            qmin, qmax = qrange(self.fmt.a_bits, symmetric=False) if self.fmt.a_bits < 16 else (0, 255)
            scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
            zero = torch.clamp(torch.round(-lo / scale) + qmin, qmin, qmax)
        dev = self.weight.device
        self.input_scale, self.input_zero, self.a_split = scale.to(dev), zero.to(dev), split

    def _act_args(self, device) -> dict:
        # ~20 us of Python and two tensor copies per call otherwise (a UNet step makes ~300 quantized calls): kept
        # while the range tensors are the same storage at the same version and the group and device are the same
        if torch.compiler.is_compiling():  # (data pointers and version counters are not traceable)
            return self._make_act_args(device)
        key = (self.fmt, *self._act_key(device))
        memo = self.__dict__.get("_act_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        args = self._make_act_args(device)
        self.__dict__["_act_memo"] = (key, args)
        return args

    def _act_key(self, device) -> tuple:
        """Changes whenever the activation arguments for `device` of this format (`_act_args`) may have."""
        sc, zp = self.input_scale, self.input_zero
        return (device, self.act_group, self.a_split) + (
            () if sc is None else (sc.data_ptr(), version_of(sc), sc.device, zp.data_ptr(), version_of(zp)))

    def _make_act_args(self, device) -> dict:
        f = self.fmt
        if f.a_bits >= 16:
            return {"a_bits": 16, "a_mode": "none", "a_scale": None, "a_zero": None, "a_split": None}
        if f.a_mode == "dynamic":
            return {"a_bits": f.a_bits, "a_mode": "fp8_dynamic" if f.a_fp8 else "dynamic", "a_scale": None,
                    "a_zero": None, "a_split": None}
        if self.input_scale is None:
            raise RuntimeError(f"{type(self).__name__} with static {f.a_bits}-bit activations has no calibrated "
                               "range: calibrate first, or use dynamic activations")
        g = min(self.act_group, self.input_scale.shape[0] - 1)
        return {"a_bits": f.a_bits, "a_mode": "fp8_static" if f.a_fp8 else "static",
                "a_scale": self.input_scale[g].to(device),
                "a_zero": self.input_zero[g].to(device), "a_split": self.a_split}

    # --- ComfyUI LoRA hooks (ModelPatcher: convert_weight -> lora.calculate_weight -> set_weight) ------------------
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """`weight` is a float copy of `self.weight` (for a packed layer: the blob's bytes as floats). Returns the
        dequantized weight in the float layer's shape, for a LoRA to be added to it."""
        if not self.packed:
            return weight
        blob = weight.detach().round().clamp(0, 255).to(torch.uint8)
        return self._from_2d(self._unbalance(self._blob_to_2d(blob))).to(weight.dtype)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs):
        """Requantize a patched float weight (fresh scales: a LoRA may widen the range). min-max ranges keep LoRA
        loading fast; the MSE range search is for calibration time."""
        if self.packed:
            new = self._pack(weight.to(self.weight.device), search="minmax")
        else:
            new = weight.to(device=self.weight.device, dtype=self.weight.dtype)
        if self.bos_in is not None:  # the precomputed BOS output follows the patched weight (and comes back with
            self._remember_bos()     # the original when ComfyUI restores only `.weight`)
            self.set_bos(self.bos_in, self._to_2d(weight.float()))
            self._bos_table[_checksum(new)] = self.bos_out
        if return_weight:
            return new
        self._w_hat = None
        if inplace_update and new.shape == self.weight.shape:
            with torch.no_grad():  # (not through .data: this write must bump the version counter kernel caches key on)
                self.weight.copy_(new)
            self._new_weight_epoch()  # (an inference tensor has no version counter)
        else:
            self.weight = nn.Parameter(new, requires_grad=False)

    # --- shared forward pieces -------------------------------------------------------------------------------------
    def _params_on(self, device):
        w = self.weight if self.weight.device == device else self.weight.to(device, non_blocking=True)
        for f in self.weight_function:  # low-VRAM LoRA patches (see above)
            w = f(w)
        b = self.bias
        if b is not None and b.device != device:
            b = b.to(device, non_blocking=True)
        for f in self.bias_function:
            b = f(b)
        return w, b

    def _packed_call(self, x: torch.Tensor, blob: torch.Tensor, bias, op: str, geometry: dict) -> torch.Tensor:
        """The packed layer's kernel call on x: bound (`_bound`) where it can be, else through dispatch."""
        codes = fused_codes(self, x)
        run = self._bound(x, blob, bias, op, geometry)
        if run is not None:
            return run(x, codes)
        return getattr(dispatch, op)(x, codes=codes, **self._kernel_args(blob, bias, x.device), **geometry)

    def _bound(self, x: torch.Tensor, blob: torch.Tensor, bias, op: str, geometry: dict):
        """The packed layer's kernel call for inputs like x (dispatch.bind: backend, route and launch resolved
        once), kept while nothing it fixed can have changed: x's shape, strides, dtype and device; the weight
        (pointer, version, epoch) and bias; the activation arguments; dispatch.state(). None where a call is not
        bound: under torch.compile, with per-call weight patches or copies (ComfyUI's low-VRAM mode), or while
        dispatch cannot fix its choice (a graph capture)."""
        if torch.compiler.is_compiling() or self.weight_function or self.bias_function or blob is not self.weight:
            return None
        weights = (blob.data_ptr(), version_of(blob), self.weight_epoch(),
                   None if bias is None else (bias.data_ptr(), version_of(bias)), self.fmt)  # (compared, not hashed)
        memo = self.__dict__.get("_bound_memo")
        if memo is None or memo[0] != weights:  # (calls bound to another weight are dropped, not kept beside)
            memo = self.__dict__["_bound_memo"] = (weights, {})
        key = (x.shape, x.stride(), x.dtype, x.device, self._act_key(x.device), dispatch.state())
        run = memo[1].get(key)
        if run is None:  # several shapes per layer are usual (the BOS split's two calls, batch sizes, timestep groups)
            run = dispatch.bind(op, x, **self._kernel_args(blob, bias, x.device), **geometry)
            if run is not None:
                if len(memo[1]) >= 16:
                    memo[1].clear()
                memo[1][key] = run
        return run

    def _kernel_args(self, blob, bias, device) -> dict:
        codes, scale, zero = self.packed_parts(blob)
        if not torch.compiler.is_compiling():
            self._kernel_cache["epoch"] = self.weight_epoch()
        return dict(qweight=codes, scale=scale, zero=zero, bits=self.fmt.w_bits, k=self.k,
                    group_size=self.fmt.group_size, bias=bias, cache=self._kernel_cache, **self._act_args(device))

    def extra_repr(self) -> str:
        return f"{self.k}->{self.n}, {self.fmt.name}, mode={self.mode}"


class QuantLinear(QuantLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: LayerFormat, mode: str = "packed",
                 device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._setup(out_features, in_features, fmt, mode)
        if fmt.w_bits < 16 and mode == "packed":
            rb = row_layout(in_features, fmt.w_bits, self.groups, not fmt.symmetric)["row_bytes"]
            w = torch.zeros(out_features, rb, dtype=torch.uint8, device=device)
        else:
            w = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_float(cls, layer: nn.Linear, fmt: LayerFormat, mode: str = "packed", search: str = "auto",
                   smooth: torch.Tensor | None = None):
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, fmt, mode,
                device=layer.weight.device, dtype=layer.weight.dtype)
        q.search = search
        q.set_smooth(smooth)
        with torch.no_grad():
            if q.packed:
                q.weight.data = q._pack(layer.weight, search)
            else:
                q.weight.data = layer.weight.detach().clone()
            if layer.bias is not None:
                q.bias.data = layer.bias.detach().clone()
        return q

    def _to_2d(self, w):
        return w

    def _from_2d(self, w2d):
        return w2d

    def set_bos(self, bos_in: torch.Tensor, w_float_2d: torch.Tensor):
        """Compute the context's token 0 in full precision from now on: store e_BOS and W·e_BOS + b (from the FP
        weight, which is not kept). Only valid for the text encoder the embedding came from."""
        dev = self.weight.device
        b = None if self.bias is None else self.bias.float().to(dev)
        self.bos_in = bos_in.float().reshape(-1).to(dev)
        self.bos_out = F.linear(self.bos_in, w_float_2d.float().to(dev), b)

    def _remember_bos(self):
        table = self.__dict__.setdefault("_bos_table", {})
        if not table and self.bos_out is not None:
            table[_checksum(self.weight)] = self.bos_out

    def _current_bos_out(self) -> torch.Tensor:
        table = self.__dict__.get("_bos_table")
        if not table or len(table) < 2 or self.weight_function:  # never patched, or patched per call (low VRAM)
            return self.bos_out
        # the checksum reads the whole weight: compute it once per weight write, not on every forward (the weight is
        # a CountedParameter, so a write through `.data`, as ComfyUI swaps hook-scheduled LoRA weights, counts too;
        # on the CPU the fingerprint of the scales, or of a float weight, is a second check)
        probe = self.packed_parts()[1] if self.packed else self.weight
        key = (self.weight.data_ptr(), version_of(self.weight), self.weight_epoch(), len(table), id(self.bos_out),
               fingerprint(probe))
        memo = self.__dict__.get("_bos_memo")
        if memo is None or memo[0] != key:
            memo = self.__dict__["_bos_memo"] = (key, table.get(_checksum(self.weight), self.bos_out))
        return memo[1]

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        blob, bias = self._params_on(x.device)
        x = self._balance(x, -1)
        if self.packed:
            return self._packed_call(x, blob, bias, "linear", {})
        act = self._act_args(x.device)
        xq = reference.fake_quant_act(x, act["a_bits"], act["a_mode"], act["a_scale"], act["a_zero"], act["a_split"])
        w = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
        return F.linear(xq, w, None if bias is None else bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos_out is None or x.dim() != 3 or x.shape[1] < 2:
            return self._compute(x)
        # tokens 1..N through the quantized path; token 0: the precomputed FP output where it is the BOS embedding,
        # the bias where the conditioning is all zeros (e.g. ComfyUI's ConditioningZeroOut), else quantized
        bos_in, bos_out = self.bos_in.to(x.device), self._current_bos_out().to(x.device, x.dtype)
        x0 = x[:, 0].float()
        is_bos = (x0 - bos_in).abs().amax(-1) <= 1e-3 * bos_in.abs().amax()
        is_zero = x0.abs().amax(-1) == 0
        rest = self._compute(x[:, 1:])
        tok0 = self._compute(x[:, :1])[:, 0]
        zero_out = torch.zeros_like(bos_out) if self.bias is None else self.bias.to(x.device, x.dtype)
        tok0 = torch.where(is_bos[:, None], bos_out, torch.where(is_zero[:, None], zero_out, tok0))
        return torch.cat([tok0[:, None], rest], dim=1)


class QuantConv2d(QuantLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, fmt: LayerFormat = LayerFormat(), mode: str = "packed", device=None,
                 dtype=torch.float32):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride),
                                                                       pair(padding), pair(dilation))
        kh, kw = self.kernel_size
        self._setup(out_channels, in_channels * kh * kw, fmt, mode)
        if fmt.w_bits < 16 and mode == "packed":
            rb = row_layout(self.k, fmt.w_bits, self.groups, not fmt.symmetric)["row_bytes"]
            w = torch.zeros(out_channels, rb, dtype=torch.uint8, device=device)
        else:
            w = torch.zeros(out_channels, in_channels, kh, kw, dtype=dtype, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_float(cls, layer: nn.Conv2d, fmt: LayerFormat, mode: str = "packed", search: str = "auto",
                   smooth: torch.Tensor | None = None):
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("QuantConv2d supports groups=1 and numeric zero padding only")
        q = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.bias is not None, fmt, mode, device=layer.weight.device,
                dtype=layer.weight.dtype)
        q.search = search
        q.set_smooth(smooth)
        with torch.no_grad():
            q.weight.data = q._pack(layer.weight, search) if q.packed else layer.weight.detach().clone()
            if layer.bias is not None:
                q.bias.data = layer.bias.detach().clone()
        return q

    def _to_2d(self, w):
        return reference.conv_weight_to_2d(w)

    def _from_2d(self, w2d):
        kh, kw = self.kernel_size
        return reference.conv_weight_from_2d(w2d, self.in_channels, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blob, bias = self._params_on(x.device)
        x = self._balance(x, 1)
        geometry = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                        dilation=self.dilation)
        if self.packed:
            return self._packed_call(x, blob, bias, "conv2d", geometry)
        act = self._act_args(x.device)
        w = self.dequantized_weight().to(x.device)
        return reference.conv2d(x, w, bias, a_bits=act["a_bits"], a_mode=act["a_mode"], a_scale=act["a_scale"],
                                a_zero=act["a_zero"], a_split=act["a_split"], **geometry)


def set_act_group(model: nn.Module, group: int) -> None:
    """Select the row of static activation ranges (the timestep group) every quantized layer uses."""
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.act_group = group


def act_group_at(bounds: list[float], t: float) -> int:
    """The timestep group of timestep `t`: `bounds[g]` is the lowest timestep of group g (noisiest group first)."""
    return next((i for i, b in enumerate(bounds) if t >= b), len(bounds) - 1)


def attach_act_group_switch(model: nn.Module, bounds: list[float], timestep_fn, remember: bool = True):
    """Timestep-aware activation ranges at run time (the one switch: quantized models, trial swaps and probes): before
    each denoiser call, every quantized layer inside `model` takes the group whose range of timesteps holds this
    call's timestep. `bounds[g]` is the lowest timestep of group g (noisiest group first); `timestep_fn(args, kwargs)`
    reads the timestep from the call. `remember`: note the bounds on the model (a saved file keeps them). Returns the
    hook handle."""
    bounds = list(bounds)

    def pre(mod, args, kwargs):
        set_act_group(mod, act_group_at(bounds, float(timestep_fn(args, kwargs))))

    if remember:
        model._mixquant_act_groups = bounds
    return model.register_forward_pre_hook(pre, with_kwargs=True)
