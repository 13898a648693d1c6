"""Run mypy on the installed layout: ghostmatch/, indexes/ and cli/ as one package.

mypy cannot follow setuptools' package-dir mapping, so this mirrors the mapping with
symlinks under build/typecheck and checks that tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {
    "ghostmatch": "ghostmatch",
    "ghostmatch/indexes": "indexes",
    "ghostmatch/cli": "cli",
}


def main() -> int:
    tree = ROOT / "build" / "typecheck"
    shutil.rmtree(tree, ignore_errors=True)
    for target, source in MAPPING.items():
        dest = tree / target
        dest.mkdir(parents=True, exist_ok=True)
        for file in sorted((ROOT / source).rglob("*.py")):
            link = dest / file.relative_to(ROOT / source)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(file, link)
    (tree / "ghostmatch" / "py.typed").touch()
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    command += ["-p", "ghostmatch"]
    env = dict(os.environ, MYPYPATH=str(tree))
    return subprocess.call(command, cwd=tree, env=env)


if __name__ == "__main__":
    sys.exit(main())
