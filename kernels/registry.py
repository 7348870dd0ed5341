"""The backend registry: which implementation runs a quantized op, after comfy-kitchen's registry.

- A priority list of backend names; a `Backend` registers its ops, and per op a `Constraints`: what calls it takes,
  as data (devices, dtypes, weight bits, group sizes, activation modes and bits), plus `rules` for what data does
  not say (shapes, the device's capability, layouts). A rule or a failed check gives the reason as a string.
- Each backend says whether it can run here at all (`available() -> None | reason`): probed once, memoised.
- `select(op, **call)`: the first backend in priority order that is available, implements `op` and whose
  constraints accept the call; the fallback backend (the reference, which accepts everything) when none does.
- Forcing: `use_backend(name)` (a context) or MIXQUANT_KERNELS=name restricts the choice to that backend (calls it
  does not accept still go to the fallback); forcing the fallback's name runs the fallback everywhere.

This module knows no backend; kernels/dispatch.py declares and registers them.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Constraints:
    """What one backend's op accepts. None (or False) = no constraint. Checked in this order, first failure wins:
    the input x (device type, dtype, number of dims), then `rules` in order, then the weight (on x's device, bits,
    group size), then the activations (mode, bits when quantized)."""
    devices: frozenset | None = None  # x.device.type
    dtypes: frozenset | None = None  # x.dtype
    x_dims: int | None = None  # x.dim()
    rules: tuple = ()  # callables (call dict) -> None | why not, for what the fields here do not say
    weight_on_x_device: bool = False  # qweight on x's device (checked when the call has a qweight)
    bits: frozenset | None = None  # weight bits
    group_multiple: int | None = None  # group-wise weight scales: group_size a multiple of this
    a_modes: frozenset | None = None  # "none" / "static" / "dynamic"
    max_a_bits: int | None = None  # quantized activations (a_mode != "none"): at most this many bits

    def check(self, call: dict) -> str | None:
        """None when the call is accepted, else why not."""
        x = call["x"]
        if self.devices is not None and x.device.type not in self.devices:
            return f"tensor on {x.device.type}, not {'/'.join(sorted(self.devices))}"
        if self.dtypes is not None and x.dtype not in self.dtypes:
            return f"activation dtype {x.dtype}"
        if self.x_dims is not None and x.dim() != self.x_dims:
            return f"input is not {self.x_dims}-D" + (" NCHW" if self.x_dims == 4 else "")
        for rule in self.rules:
            why = rule(call)
            if why is not None:
                return why
        if self.weight_on_x_device:
            q = call.get("qweight")
            if q is not None and q.device != x.device:
                return "weight and input are on different devices"
        if self.bits is not None and call["bits"] not in self.bits:
            return f"{call['bits']}-bit weights"
        if self.group_multiple is not None and call["scale"].shape[1] > 1 and (
                call["group_size"] is None or call["group_size"] % self.group_multiple != 0):
            return f"group size must be a multiple of {self.group_multiple}"
        a_mode = call.get("a_mode")
        if self.a_modes is not None and a_mode not in self.a_modes:
            return f"activation mode {a_mode!r}"
        if self.max_a_bits is not None and a_mode != "none" and call["a_bits"] > self.max_a_bits:
            return f"{call['a_bits']}-bit activations"
        return None

    def describe(self) -> str:
        """The constraints as one line of text (for `explain()`)."""
        parts = []
        if self.devices is not None:
            parts.append("devices " + "/".join(sorted(self.devices)))
        if self.dtypes is not None:
            parts.append("x " + "/".join(sorted(str(d).replace("torch.", "") for d in self.dtypes)))
        if self.x_dims is not None:
            parts.append(f"x {self.x_dims}-D")
        if self.weight_on_x_device:
            parts.append("weight on x's device")
        if self.bits is not None:
            parts.append("W" + "/".join(map(str, sorted(self.bits))))
        if self.group_multiple is not None:
            parts.append(f"groups of a multiple of {self.group_multiple}")
        if self.a_modes is not None:
            parts.append("activations " + "/".join(sorted(self.a_modes)))
        if self.max_a_bits is not None:
            parts.append(f"A<={self.max_a_bits} when quantized")
        parts += [getattr(r, "__doc__", None) or r.__name__ for r in self.rules]
        return "; ".join(parts) or "any call"


ANY = Constraints()


@dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[], str | None]  # None when usable on this machine, else the reason; probed once
    ops: dict = field(default_factory=dict)  # op name -> implementation
    constraints: dict = field(default_factory=dict)  # op name -> Constraints (absent: ANY)


class Registry:
    """Backends by name, tried in `priority` order; `fallback` (a registered backend accepting every call) runs what
    none of the others takes."""

    def __init__(self, priority: list[str], fallback: str):
        self._priority = list(priority)
        self.fallback = fallback
        self._backends: dict[str, Backend] = {}
        self._why: dict[str, str | None] = {}  # availability, probed once per backend
        self._order: list[Backend] = []
        self._forced: list[str | None] = [None]

    def register(self, backend: Backend) -> None:
        """Add or replace a backend (a name not in the priority list goes last, before the fallback)."""
        self._backends[backend.name] = backend
        self._why.pop(backend.name, None)
        if backend.name not in self._priority:
            at = self._priority.index(self.fallback) if self.fallback in self._priority else len(self._priority)
            self._priority.insert(at, backend.name)
        self._reorder()

    def set_priority(self, names: list[str]) -> None:
        self._priority = list(names)
        self._reorder()

    def _reorder(self) -> None:
        self._order = [self._backends[n] for n in self._priority if n in self._backends and n != self.fallback]

    def backends(self) -> list[Backend]:
        """The registered backends in priority order, the fallback last."""
        return self._order + ([self._backends[self.fallback]] if self.fallback in self._backends else [])

    def why_unavailable(self, name: str) -> str | None:
        if name not in self._why:
            self._why[name] = self._backends[name].available()
        return self._why[name]

    @contextlib.contextmanager
    def use_backend(self, name: str | None):
        """Force one backend (the fallback included) inside the block."""
        self._forced.append(name)
        try:
            yield
        finally:
            self._forced.pop()

    def forced(self) -> str | None:
        return self._forced[-1] or os.environ.get("MIXQUANT_KERNELS") or None

    def select(self, op: str, **call) -> tuple[str, Callable]:
        """(backend name, implementation) for this call."""
        forced = self.forced()
        if forced != self.fallback:
            for b in self._order:
                if forced and b.name != forced:
                    continue
                if op not in b.ops or self.why_unavailable(b.name) is not None:
                    continue
                c = b.constraints.get(op)
                if c is None or c.check(call) is None:
                    return b.name, b.ops[op]
        return self.fallback, self._backends[self.fallback].ops[op]

    def why_not(self, name: str, op: str, **call) -> str | None:
        """None when backend `name` would take this call (forcing aside), else why not."""
        b = self._backends.get(name)
        if b is None:
            return "not registered"
        if op not in b.ops:
            return "not implemented"
        why = self.why_unavailable(name)
        if why is not None:
            return why
        c = b.constraints.get(op)
        return None if c is None else c.check(call)


# --- custom ops: the form each quantized call takes under torch.compile (one op in the graph per layer) -----------
OP_SCHEMA = ("(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, int bits, int k, int? group_size, Tensor? bias, "
             "int a_bits, str a_mode, Tensor? a_scale, Tensor? a_zero, int? a_split, Tensor? wsum")
OP_ARGS = ("qweight", "scale", "zero", "bits", "k", "group_size", "bias", "a_bits", "a_mode", "a_scale", "a_zero",
           "a_split")  # the schema's arguments after x, before wsum


def custom_op(name, impl, fake, schema):
    """Register `name` (torch.library.custom_op with a fake for tracing), or return the one registered already.

    The package can be imported twice in one process under different names (ComfyUI loads the node pack by its
    folder, pytest imports the checkout's root package as `main`). torch.library.custom_op on a name that exists
    destroys the first registration, leaving the first import's op handles pointing at a freed schema (a
    `vector::reserve` error or a segfault when dynamo next runs them), so an existing op is reused, never replaced."""
    import torch

    ns, op_name = name.split("::")
    try:  # (torch.ops caches what it returns: one object for every import of this package)
        return getattr(getattr(torch.ops, ns), op_name).default
    except AttributeError:  # not registered yet
        pass
    torch.library.custom_op(name, impl, mutates_args=(), schema=schema).register_fake(fake)  # torch keeps it
    return getattr(getattr(torch.ops, ns), op_name).default
