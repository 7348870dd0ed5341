"""Run by ComfyUI-Manager and by the WebUIs (Forge / A1111 run an extension's install.py at every start): installs
what requirements.txt lists (what MixQuant needs inside a host) and is not installed at all, and nothing else. A
package the host already has stays at the host's version even where requirements.txt asks for a newer one (the host
pins it): a line says so. Idempotent: with everything in place it starts no pip at all. Never touches torch
(requirements.txt does not list it)."""
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


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0]


def missing(reqs: list[str]) -> list[str]:
    """The requirements whose package is not installed at all."""
    from importlib import metadata

    out = []
    for r in reqs:
        try:
            metadata.version(_name(r))
        except metadata.PackageNotFoundError:
            out.append(r)
    return out


def older(reqs: list[str]) -> list[str]:
    """'name version (wants spec)' for installed packages older than requirements.txt asks (left as they are)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        return []
    out = []
    for r in reqs:
        req = Requirement(r)
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name} {have} (requirements.txt asks for {req.specifier})")
    return out


def main() -> int:
    reqs = [r for r in requirements(os.path.join(HERE, "requirements.txt"))
            if _name(r).lower() != "torch"]
    for line in older(reqs):
        print(f"[MixQuant] keeping the installed {line}")
    todo = missing(reqs)
    if not todo:
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *todo]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
