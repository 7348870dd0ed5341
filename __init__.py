"""MixQuant: mixed-precision quantization of text-to-image diffusion models.

This folder is at once the importable package ``mixquant`` and a ComfyUI node pack. ComfyUI imports it under
whatever name the folder has, so everything inside uses relative imports only. Importing it never requires
ComfyUI: the node classes only touch ``comfy`` inside their functions.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# Our subfolders are no top-level modules (issue #20). When this folder or bench/ is on sys.path (Python run from the
# checkout puts '' or the cwd there; `python bench/x.py` puts bench/ there), `import kernels` would find our
# kernels/ or bench/kernels.py instead of the Hugging Face `kernels` package that diffusers probes and imports (the
# same for any package named quant, app, nodes or bench). A path hook makes those two folders, as sys.path entries,
# answer "not here" for these top-level names, so the import (and importlib.util.find_spec) goes on down sys.path;
# everything else in them (bench/'s `common`, `pipeline`, `peers`, and mixquant's own submodules, which are looked
# up by their full dotted names) is found as before. sys.path itself is left alone, so a script that inserts its
# folder again is covered too. bench/common.py imports this package first for the bench scripts. Under ComfyUI the
# pack's folder is not on sys.path: the hook never matches, and ComfyUI's own `nodes` and `app` are not touched.
_HIDDEN = frozenset(("kernels", "quant", "app", "nodes", "bench", "webui"))


def _hide_top_level_names() -> None:
    root = _os.path.realpath(_os.path.dirname(_os.path.abspath(__file__)))
    ours = {root, _os.path.join(root, "bench")}
    if any(getattr(h, "mixquant_root", None) == root for h in _sys.path_hooks):
        return

    def is_ours(p) -> bool:
        try:
            return _os.path.realpath(p or _os.getcwd()) in ours
        except (OSError, TypeError, ValueError):
            return False

    class _Hiding:  # a path entry finder: the usual finder for our folder, minus the top-level names of _HIDDEN
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, fullname, target=None):
            return None if fullname in _HIDDEN else self.inner.find_spec(fullname, target)

        def invalidate_caches(self):
            self.inner.invalidate_caches()

        def __getattr__(self, name):
            if name == "inner":
                raise AttributeError(name)
            return getattr(self.inner, name)

    def hook(entry):
        if not is_ours(entry):
            raise ImportError("not a MixQuant folder")
        for other in _sys.path_hooks:
            if other is not hook:
                try:
                    return _Hiding(other(entry))
                except ImportError:
                    continue
        raise ImportError(entry)

    hook.mixquant_root = root
    _sys.path_hooks.insert(0, hook)
    for p in [p for p in _sys.path_importer_cache if is_ours(p)]:  # finders made before the hook: made again
        del _sys.path_importer_cache[p]
    for top in _HIDDEN:  # imported from our folders before this ran: forgotten, so the next import finds the real one
        mod = _sys.modules.get(top)
        if mod is None:
            continue
        f = getattr(mod, "__file__", None)
        entries = [_os.path.dirname(p) for p in getattr(mod, "__path__", None) or []]  # a package: its parent folder
        entries = entries or ([_os.path.dirname(f)] if f else [])
        if any(is_ours(e) for e in entries):
            for name in [n for n in _sys.modules if n == top or n.startswith(top + ".")]:
                del _sys.modules[name]


_hide_top_level_names()

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # loaded as a bare file, not as a package (pytest collecting a checkout folder whose name is no identifier)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
