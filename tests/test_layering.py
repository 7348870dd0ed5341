"""Issue #20: the import rules between the package's parts, checked on the source with `ast` (every import statement,
relative or absolute, also those inside functions; nothing is imported to check it).

- quant/ imports no diffusers, transformers, gradio, comfy, folder_paths, nor app/ or nodes/;
- kernels/ imports no quant/, app/ or nodes/;
- app/: cli -> {diffusers_host, digits, gradio_app} -> quant/, kernels/; gradio_app -> {diffusers_host, digits};
  diffusers_host -> digits. So app.diffusers_host, app.digits and app.gradio_app import nothing from app.cli;
  app.diffusers_host and app.digits nothing from app.gradio_app; app.digits nothing from app.diffusers_host;
  and no module outside app/cli/ imports app.cli (only the `mixquant` entry point names it);
- nodes/ imports no app/ and no webui/;
- webui/ imports no WebUI module (modules, backend), no gradio, ComfyUI or diffusers, and no app/ (the glue in
  scripts/ brings the WebUI in).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "mixquant"
# our top-level folders: written as absolute top-level names (`import quant`) they would mean our folders too
OURS = ("quant", "kernels", "app", "nodes", "bench", "webui")

# (modules the rule covers, forbidden import prefixes, why)
RULES = [
    ("mixquant.quant", ("diffusers", "transformers", "gradio", "comfy", "comfy_extras", "folder_paths",
                        "mixquant.app", "mixquant.nodes"),
     "quant/ is the method: torch only, no hosts"),
    ("mixquant.kernels", ("mixquant.quant", "mixquant.app", "mixquant.nodes"), "kernels/ is compute only"),
    ("mixquant.app.diffusers_host", ("mixquant.app.cli", "mixquant.app.gradio_app"),
     "the diffusers host imports neither the CLI nor the Gradio app"),
    ("mixquant.app.digits", ("mixquant.app.cli", "mixquant.app.gradio_app", "mixquant.app.diffusers_host"),
     "the digits model imports no host and no front end"),
    ("mixquant.app.gradio_app", ("mixquant.app.cli",), "the Gradio app imports the hosts, never the CLI"),
    ("mixquant.nodes", ("mixquant.app", "mixquant.webui"), "the ComfyUI nodes import neither app/ nor webui/"),
    ("mixquant.webui", ("modules", "backend", "gradio", "comfy", "folder_paths", "diffusers", "mixquant.app"),
     "webui/ is the WebUI host's logic: the WebUI's own modules come in through scripts/mixquant_webui.py"),
    ("mixquant", ("mixquant.app.cli",), "nothing imports the CLI (only the entry point names it)"),
]
EXEMPT = {"mixquant.app.cli"}  # the CLI package itself may import its own modules


def module_files():
    """(dotted module name, path, is_package) of every .py file of the package (tests/ excluded)."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        parts = [] if rel == "." else rel.split(os.sep)
        if parts and (parts[0] in ("tests", "models", "web", "examples", "docs") or parts[0].startswith(".")
                      or parts[0].endswith(".egg-info") or parts[0] == "build"):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
        for f in files:
            if f.endswith(".py"):
                is_pkg = f == "__init__.py"
                name = ".".join([PKG] + parts + ([] if is_pkg else [f[:-3]]))
                out.append((name, os.path.join(folder, f), is_pkg))
    return out


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) for every import statement of `source`; `from X import a, b` gives X, X.a, X.b
    (a name may be a submodule); relative imports are resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    raise AssertionError(f"{module}:{node.lineno}: relative import beyond the package")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
    # an absolute import of one of our folders' names (`import app.cli` from the checkout) names our folder too
    return [(ln, f"{PKG}.{n}" if n.split(".")[0] in OURS else n) for ln, n in found]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(files=None) -> list[str]:
    bad = []
    for module, path, is_pkg in files or module_files():
        with open(path, encoding="utf-8") as f:
            found = imports_of(f.read(), module, is_pkg)
        for scope, forbidden, why in RULES:
            if not _under(module, scope) or any(_under(module, e) for e in EXEMPT):
                continue
            seen = set()
            for line, name in sorted(found, key=lambda x: (x[0], len(x[1]))):  # `from X import a`: report X once
                if line not in seen and any(_under(name, p) for p in forbidden):
                    seen.add(line)
                    bad.append(f"{os.path.relpath(path, ROOT)}:{line}: imports {name} ({why})")
    return sorted(bad)


def test_the_walk_sees_every_part():
    names = {m for m, _, _ in module_files()}
    for expected in ("mixquant", "mixquant.quant.engine", "mixquant.kernels.dispatch", "mixquant.nodes.nodes",
                     "mixquant.app.cli", "mixquant.app.cli.quantize", "mixquant.app.gradio_app",
                     "mixquant.app.diffusers_host.api", "mixquant.app.diffusers_host.files", "mixquant.app.digits",
                     "mixquant.app.digits.train"):
        assert expected in names, expected


def test_relative_and_absolute_imports_resolve():
    src = ("from ...quant.errors import MixQuantError\n"
           "from .. import cli\n"
           "def f():\n"
           "    from ..cli.quantize import run\n"
           "    import app.cli\n"
           "    import diffusers.pipelines\n")
    names = {n for _, n in imports_of(src, "mixquant.app.diffusers_host.files", False)}
    assert {"mixquant.quant.errors", "mixquant.quant.errors.MixQuantError", "mixquant.app.cli",
            "mixquant.app.cli.quantize", "diffusers.pipelines"} <= names
    # in a package's __init__ the package itself is the anchor of `.`
    assert ("mixquant.quant.errors" in {n for _, n in imports_of("from ...quant import errors\n", "mixquant.app.cli",
                                                                  True)})


@pytest.mark.parametrize("module, is_pkg, line, rule", [
    ("mixquant.quant.engine", False, "import diffusers", "quant/"),
    ("mixquant.quant.engine", False, "def f():\n    from ..app.digits import DIGITS_DIR", "quant/"),
    ("mixquant.kernels.dispatch", False, "from ..quant import formats", "kernels/"),
    ("mixquant.app.diffusers_host.harness", False, "def f():\n    from ..cli.generate import run", "diffusers host"),
    ("mixquant.app.digits", True, "from ..diffusers_host.models import load_pipeline", "digits model"),
    ("mixquant.app.gradio_app", False, "def f():\n    from .cli import quantize", "Gradio app"),
    ("mixquant.app.gradio_app", False, "from mixquant.app.cli.quantize import read_prompts", "Gradio app"),
    ("mixquant.nodes.nodes", False, "from ..app.diffusers_host import files", "ComfyUI nodes"),
    ("mixquant.bench.peers", False, "import app.cli", "nothing imports the CLI"),
])
def test_a_planted_violation_is_caught(tmp_path, module, is_pkg, line, rule):
    path = tmp_path / "m.py"
    path.write_text(line + "\n")
    bad = violations([(module, str(path), is_pkg)])
    assert bad and any(rule in b for b in bad), bad


def test_import_rules():
    bad = violations()
    assert not bad, "import rules broken (see tests/test_layering.py):\n" + "\n".join(bad)
