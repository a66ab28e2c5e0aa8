"""What a release ships: the sdist has the example config, the docs, the service files and the
tests with every helper they import; the wheel built from it (what pip and pipx install) has the
example config inside the package, so `proxy init` works without the source tree."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _repo_files(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / folder).rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pem", ".key"):
            found.add(path.relative_to(ROOT).as_posix())
    return found


def test_sdist_and_wheel_contents(tmp_path):
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("*.whl")

    with tarfile.open(sdist) as archive:
        prefix = archive.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    needed = {"config.example.yaml", "proxy/config.example.yaml", "README.md", "LICENSE", "pyproject.toml",
              "certs/README.md", "contrib/oauth2-mail-proxy.service", "tests/run.sh", ".ci/run"}
    needed |= _repo_files("docs") | _repo_files("tests") | _repo_files("bench") | _repo_files("contrib")
    assert needed - names == set()
    assert not [n for n in names if n.endswith((".pem", ".key", ".pyc", ".tokens")) or "__pycache__" in n]
    # every module the tests import from tests/ or bench/ is in the sdist
    for name in names:
        if name.startswith("tests/") and name.endswith(".py"):
            with tarfile.open(sdist) as archive:
                tree = ast.parse(archive.extractfile(f"{prefix}/{name}").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("tests", "bench"):
                    base = node.module.replace(".", "/")
                    modules = [base] if "." in node.module else [f"{base}/{a.name}" for a in node.names]
                    for module in modules:
                        assert module + ".py" in names or module + "/__init__.py" in names, (name, module)

    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("proxy/config.example.yaml").decode("utf-8")
        archive.extractall(tmp_path / "installed")
    assert shipped == (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    # `proxy init` from the wheel alone (PYTHONPATH first, so not the source tree's package)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "installed")}
    where = subprocess.run([sys.executable, "-c", "import proxy; print(proxy.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=60)
    assert where.stdout.strip().startswith(str(tmp_path / "installed")), where
    init = subprocess.run([sys.executable, "-m", "proxy", "init", str(tmp_path / "site" / "config.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "site" / "config.yaml").read_text(encoding="utf-8") == shipped
