"""Issue #20: the checkout's top-level folders (kernels/, quant/, app/, nodes/, bench/) and bench/kernels.py must not
shadow top-level packages of the same name (diffusers probes and imports the Hugging Face `kernels` package) when
Python runs from the checkout folder (cwd on sys.path) or runs a bench script (bench/ on sys.path).

Each check is a fresh `python` of this venv with HF_HUB_OFFLINE=1, once from the checkout folder and once from a
temporary folder:
- the README's Python imports and `load_pipeline("digits")` (a real diffusers UNet: the import that failed);
- every `python bench/...` / `python -m mixquant.bench...` command of README.md and of the bench scripts' docstrings
  (test_every_documented_bench_command_is_covered keeps the list below complete). overhead.py and pool_content.py
  run for real (cheap, outputs in a temp folder); the others take minutes, so they run under IMPORT_CHECK (a
  sitecustomize): the documented command line as written, stopped when the script parses its arguments (every
  top-level import done, sys.path as the script leaves it); there it also parses the other documented variants,
  runs every import statement of the script (also those inside functions), builds the diffusers/transformers classes
  that import `kernels`, and asserts that no name of ours resolves to our folders. From the temporary folder only
  ELSEWHERE runs unless MIXQUANT_SLOW_TESTS=1 (a bench script's sys.path does not depend on the cwd).
Nothing is written under bench/results/.
"""
import ast
import glob
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
RESULTS = os.path.join(BENCH, "results")
POOL_RUNS = [os.path.join(RESULTS, f"peers_digits_g2_b03_seeds{s}.json") for s in (1000, 1064)]

# documented command (as written, whitespace-normalized) -> script, then the arguments it is checked with
# ({out}: a temp folder, {runs}: two committed peers runs of disjoint seed blocks)
DOCUMENTED = {
    "python bench/pipeline.py": ("bench/pipeline.py", []),
    "python bench/pipeline.py --skip-sd15": ("bench/pipeline.py", ["--skip-sd15"]),
    "python bench/kernels.py": ("bench/kernels.py", []),
    "python bench/kernels.py --device cuda": ("bench/kernels.py", ["--device", "cuda"]),
    "python bench/peers.py": ("bench/peers.py", []),
    "python bench/peers.py --skip-sd15": ("bench/peers.py", ["--skip-sd15"]),
    "python bench/peers.py --only torchao,quanto --skip-digits": ("bench/peers.py",
                                                                  ["--only", "torchao,quanto", "--skip-digits"]),
    "python bench/peers.py ... --content-seeds 64": ("bench/peers.py", ["--content-seeds", "64"]),
    "python bench/peers.py ... --content-seeds 64 --content-seed-start 1064": (
        "bench/peers.py", ["--content-seeds", "64", "--content-seed-start", "1064"]),
    "python bench/memory.py": ("bench/memory.py", []),
    "python bench/memory.py [--out bench/results/memory.md]": ("bench/memory.py", ["--out", "{out}/memory.md"]),
    "python bench/overhead.py [--calls N] [--out FILE]": ("bench/overhead.py",
                                                          ["--calls", "3", "--out", "{out}/overhead.md"]),
    "python bench/pool_content.py run1/peers_partial.json run2/peers_partial.json > pooled.md": (
        "bench/pool_content.py", ["{runs}", "--out", "{out}/pooled.md"]),
    "python bench/scale.py": ("bench/scale.py", []),
    "python bench/scale.py --agreement": ("bench/scale.py", ["--agreement"]),
    "python bench/scale.py --models sdxl --real --size 1024 --prompts 8 --steps 20": (
        "bench/scale.py", ["--models", "sdxl", "--real", "--size", "1024", "--prompts", "8", "--steps", "20"]),
    "python bench/gpu.py": ("bench/gpu.py", []),
    "python bench/gpu.py --only unet,speed": ("bench/gpu.py", ["--only", "unet,speed"]),
    "python bench/gpu.py --out DIR": ("bench/gpu.py", ["--out", "{out}"]),
    "python bench/gpu.py --only dit": ("bench/gpu.py", ["--only", "dit"]),
    "python bench/dit.py --real": ("bench/dit.py", ["--real"]),
    "python bench/dit.py": ("bench/dit.py", []),
    "python bench/dit.py --families flux --out /tmp/dit.md": ("bench/dit.py",
                                                             ["--families", "flux", "--out", "{out}/dit.md"]),
    "python bench/speed.py": ("bench/speed.py", []),
    "python bench/speed.py --models digits": ("bench/speed.py", ["--models", "digits"]),
    "python bench/speed.py --device cuda": ("bench/speed.py", ["--device", "cuda"]),
    "python -m mixquant.bench.quality": ("-m mixquant.bench.quality", []),
    "python -m mixquant.bench.quality --steps 4 --seeds 0 1 2": ("-m mixquant.bench.quality",
                                                                 ["--steps", "4", "--seeds", "0", "1", "2"]),
}
RUN_FOR_REAL = {"bench/overhead.py", "bench/pool_content.py"}  # seconds each; the rest under IMPORT_CHECK
# from another folder `python /path/bench/x.py` has the same sys.path as from the checkout (bench/ first, not the cwd):
# by default these run there, the rest too with MIXQUANT_SLOW_TESTS=1 (each script is ~6 s of CPU, mostly imports)
ELSEWHERE = {"bench/kernels.py", "bench/overhead.py", "bench/pool_content.py", "-m mixquant.bench.quality"}
COMMAND = re.compile(r"python (?:bench/\w+\.py|-m mixquant\.bench\.\w+)[^`#\n]*")

SITECUSTOMIZE = r'''
"""IMPORT_CHECK for tests/test_import_paths.py: stop a bench script when it parses its arguments."""
import argparse, ast, importlib, importlib.util, json, os, sys

_parse = argparse.ArgumentParser.parse_args
ROOT = os.environ["MIXQUANT_CHECK_ROOT"]
OURS = {ROOT, os.path.join(ROOT, "bench")}
HIDDEN = ("kernels", "quant", "app", "nodes", "bench", "webui")


def from_ours(spec_or_module) -> bool:
    locs = getattr(spec_or_module, "submodule_search_locations", None) or getattr(spec_or_module, "__path__", None)
    locs = list(locs or [])
    origin = getattr(spec_or_module, "origin", None) or getattr(spec_or_module, "__file__", None)
    folders = [os.path.dirname(p) for p in locs] or ([os.path.dirname(origin)] if origin else [])
    return any(os.path.realpath(f) in OURS for f in folders)


def check(self, args=None, namespace=None):
    ns = _parse(self, args, namespace)
    for variant in json.loads(os.environ.get("MIXQUANT_CHECK_VARIANTS", "[]")):
        _parse(self, variant)  # the other documented command lines parse too (argparse exits 2 if not)
    main = sys.modules["__main__"]
    package = main.__spec__.parent if getattr(main, "__spec__", None) else None
    tree = ast.parse(open(main.__file__).read())
    for node in ast.walk(tree):  # every import statement of the script, also those inside its functions
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = [("." * node.level + (node.module or ""), [a.name for a in node.names])]
        else:
            continue
        for mod, names in targets:
            top = mod.lstrip(".").split(".")[0]
            try:
                m = importlib.import_module(mod, package)
                for n in names or []:
                    if not hasattr(m, n):
                        importlib.import_module(f"{m.__name__}.{n}")
            except ImportError as e:
                required = mod.startswith(".") or top in ("mixquant", "torch", "diffusers", "transformers") \
                    or os.path.exists(os.path.join(os.path.dirname(main.__file__), top + ".py"))
                if required or ROOT in str(e):
                    raise
                print(f"IMPORT_CHECK: optional {mod} not importable here: {e}")
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401  (import kernels)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
    for name in HIDDEN:
        spec = importlib.util.find_spec(name)
        assert spec is None or not from_ours(spec), (name, spec)
        assert name not in sys.modules or not from_ours(sys.modules[name]), sys.modules[name]
    print("IMPORT_CHECK OK", ns, flush=True)
    sys.exit(0)


if os.environ.get("MIXQUANT_CHECK_ROOT"):
    argparse.ArgumentParser.parse_args = check
'''


def _env(tmp, import_check=False, variants=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MIXQUANT_CACHE": os.path.join(tmp, "cache")}
    if import_check:
        with open(os.path.join(tmp, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")])),
                   MIXQUANT_CHECK_ROOT=os.path.realpath(ROOT), MIXQUANT_CHECK_VARIANTS=json.dumps(list(variants)))
    return env


def _argv(script, args, out, cwd):
    args = [a.replace("{out}", out) for a in args]
    args = [r for a in args for r in (POOL_RUNS if a == "{runs}" else [a])]
    if script.startswith("-m "):
        return [sys.executable, "-m", script[3:]] + args
    # from the checkout as the README writes it; from elsewhere by its path
    return [sys.executable, script if cwd == ROOT else os.path.join(ROOT, script)] + args


def _run(argv, cwd, env, timeout=240):
    t = time.time()
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t


def _results_state() -> dict:
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(RESULTS, "**"), recursive=True)}


def _readme_python_imports() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    lines = [ln.split("#")[0].rstrip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if re.match(r"(from mixquant[\w.]* import |import mixquant)", ln)]


def _documented_commands() -> set[str]:
    texts = [open(os.path.join(ROOT, "README.md")).read()]
    texts += [ast.get_docstring(ast.parse(open(p).read())) or "" for p in glob.glob(os.path.join(BENCH, "*.py"))]
    return {" ".join(c.split()) for t in texts for c in COMMAND.findall(t)}


@pytest.fixture(params=["checkout", "elsewhere"])
def cwd(request, tmp_path_factory):
    return ROOT if request.param == "checkout" else str(tmp_path_factory.mktemp("elsewhere"))


SLOW = os.environ.get("MIXQUANT_SLOW_TESTS") == "1"


def test_every_documented_bench_command_is_covered():
    found = _documented_commands()
    assert "python bench/kernels.py" in found and "python bench/peers.py" in found  # the extraction works
    assert not found - set(DOCUMENTED), f"documented but not checked here: {sorted(found - set(DOCUMENTED))}"


def test_readme_python_and_load_pipeline(cwd, tmp_path):
    imports = _readme_python_imports()
    assert len(imports) >= 6, imports
    code = "\n".join(imports + [
        "from mixquant.app.diffusers_host.models import load_pipeline",
        "pipe = load_pipeline('digits')",
        "import sys, kernels",  # the Hugging Face package, never our folder
        "assert 'site-packages' in kernels.__file__, kernels.__file__",
        "print('OK', type(pipe.unet).__name__)"])
    r, _ = _run([sys.executable, "-c", code], cwd, _env(str(tmp_path)))
    assert r.returncode == 0 and "OK UNet2DConditionModel" in r.stdout, r.stderr[-3000:]


def test_documented_bench_commands(cwd, tmp_path):
    """Each bench script once per folder: its first documented command, with the other documented command lines of
    the same script parsed in the same process (IMPORT_CHECK), or run for real where that takes seconds."""
    by_script = {}
    for cmd, (script, args) in DOCUMENTED.items():
        by_script.setdefault(script, []).append(args)
    out = str(tmp_path / "out")
    os.makedirs(out)
    before = _results_state()
    jobs = []
    for script, variants in by_script.items():
        if cwd != ROOT and script not in ELSEWHERE and not SLOW:
            continue
        if script in RUN_FOR_REAL:
            jobs += [(script, _argv(script, a, out, cwd), _env(str(tmp_path))) for a in variants]
        else:
            first, rest = variants[0], [[a.replace("{out}", out) for a in v] for v in variants[1:]]
            sc = tmp_path / script.replace("/", "_").replace(" ", "_")
            sc.mkdir()
            jobs.append((script, _argv(script, first, out, cwd), _env(str(sc), True, rest)))
    with ThreadPoolExecutor(2) as ex:  # two at a time: most of each is importing torch and diffusers
        results = list(ex.map(lambda j: (j, *_run(j[1], cwd, j[2])), jobs))
    for (script, argv, env), r, secs in results:
        print(f"{secs:5.1f}s  {' '.join(argv[1:])}")
        assert r.returncode == 0, f"{argv} in {cwd}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        if script not in RUN_FOR_REAL:
            assert "IMPORT_CHECK OK" in r.stdout, r.stdout[-2000:]
    assert os.path.getsize(os.path.join(out, "pooled.md")) > 0 and os.path.getsize(os.path.join(out, "overhead.md")) > 0
    assert _results_state() == before, "a bench run wrote into bench/results/"
