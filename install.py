"""Run by ComfyUI-Manager and by the WebUIs (Forge / A1111 run an extension's install.py at every start): installs
what requirements.txt lists and is missing, and nothing else. Idempotent: with everything in place it starts no
pip at all. Never touches torch (requirements.txt does not list it; the host keeps its own build)."""
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(path: str) -> list[str]:
    out = []
    with open(path, encoding="utf8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


def missing(reqs: list[str]) -> list[str]:
    """The requirements not satisfied by what is installed (all of them when that cannot be told)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # no way to compare versions: let pip decide
        return list(reqs)
    out = []
    for r in reqs:
        req = Requirement(r)
        if req.name.lower() == "torch":
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(r)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(r)
    return out


def main() -> int:
    reqs = [r for r in requirements(os.path.join(HERE, "requirements.txt"))
            if not re.match(r"^torch\b", r, re.IGNORECASE)]
    todo = missing(reqs)
    if not todo:
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *todo]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
