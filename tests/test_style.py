import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed with the [test] extra")
def test_ruff_clean():
    result = subprocess.run(["ruff", "check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_imports_only_torch():
    """ARCHITECTURE: the core never imports diffusers, transformers or peft."""
    core = ["schedules", "timesteps", "prediction", "denoiser", "guidance", "sampling", "noise", "losses", "toy"]
    core += ["metrics", "leak"]
    files = [ROOT / "src" / "fullrange" / f"{name}.py" for name in core]
    files += sorted((ROOT / "src" / "fullrange" / "samplers").glob("*.py"))
    for path in files:
        text = path.read_text()
        for banned in ("diffusers", "transformers", "peft", "accelerate"):
            assert f"import {banned}" not in text and f"from {banned}" not in text, (path.name, banned)


def test_matplotlib_and_peft_each_have_one_home():
    """matplotlib is imported only by fullrange.plots, peft only by fullrange.adapters."""
    homes = {"matplotlib": "plots.py", "peft": "adapters.py"}
    for path in (ROOT / "src" / "fullrange").rglob("*.py"):
        text = path.read_text()
        for library, home in homes.items():
            if f"import {library}" in text or f"from {library}" in text:
                assert path.relative_to(ROOT / "src" / "fullrange").as_posix() == home, (path.name, library)


def _imports(path, package):
    """The fullrange modules a module imports (relative imports resolved), at any depth of the file."""
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found |= set(names)
    return found


def test_no_import_circle():
    """Imports flow one way: no module of fullrange reaches itself through its imports (lazy ones included)."""
    src = ROOT / "src"
    modules = {}
    for path in (src / "fullrange").rglob("*.py"):
        name = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        modules[name] = path, package
    graph = {
        name: {m for m in _imports(path, package) if m in modules and m != name}
        for name, (path, package) in modules.items()
    }
    # A package's __init__ re-exports its modules; importing one of them is not importing the package back.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        return seen

    circles = sorted(name for name in graph if name in reach(name))
    assert not circles, circles
