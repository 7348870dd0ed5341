"""Run by ComfyUI-Manager / WebUIs after cloning: install requirements.txt (idempotent, never touches torch)."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    req = os.path.join(HERE, "requirements.txt")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", req]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
