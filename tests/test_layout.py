"""The layout's rules that `lint-imports` does not see: no function-level import of the
project's own modules dodges the layering (a lazy import for start-up time says so with a
`# lazy:` comment), and the container image carries every package the project installs."""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = PYPROJECT["tool"]["importlinter"]["root_packages"]


def _sources() -> list[Path]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in files.stdout.split() if f.split("/")[0] in PACKAGES]


def function_level_imports(path: Path, base: Path = ROOT) -> list[str]:
    """`file:line: statement` for each import of a project module inside a function body without
    a `# lazy:` comment on its line (file relative to `base`)."""
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            line = lines[node.lineno - 1]
            if any(m.split(".")[0] in PACKAGES for m in modules) and "# lazy:" not in line:
                found.append(f"{path.relative_to(base)}:{node.lineno}: {line.strip()}")
    return found


def test_no_function_level_import_of_a_project_module(tmp_path: Path) -> None:
    found = [hit for path in _sources() for hit in function_level_imports(path)]
    assert not found, "import at module level, or mark a start-up-time import `# lazy: why`:\n" + "\n".join(
        found
    )
    # the check itself can fail
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from cluster.engine import ClusterEngine\n    return ClusterEngine\n")
    assert function_level_imports(bad, tmp_path) == ["bad.py:2: from cluster.engine import ClusterEngine"]
    bad.write_text("def f():\n    from cluster.engine import ClusterEngine  # lazy: start-up time\n")
    assert function_level_imports(bad, tmp_path) == []


def test_the_image_copies_every_installed_package() -> None:
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY \S+ (?:\S+ )*?([a-z0-9_]+)(?:/\S*)? \./\1/?$", dockerfile, re.M))
    copied |= set(re.findall(r"^COPY \S+ ([a-z0-9_]+)/\S+ .*\./\1/$", dockerfile, re.M))
    included = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert included == set(PACKAGES)
    assert included <= copied, f"k8s/Dockerfile does not COPY {sorted(included - copied)}"
