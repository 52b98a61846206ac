"""What `pip install .` installs: the library alone, never the example deployment."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_contains_only_the_governance_package(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert top_level == {
        "governance",
        f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info",
    }
    assert "governance/store/scripts/lib.lua" in names  # the Lua scripts are package data
    assert "governance/py.typed" in names


def test_the_library_imports_nothing_from_the_example_deployment() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "governance").rglob("*.py")
        if any(
            line.lstrip().startswith(("from workers", "import workers"))
            for line in path.read_text(encoding="utf-8").splitlines()
        )
    ]
    assert offenders == []


def test_every_library_module_imports_without_the_repository_on_the_path(tmp_path: Path) -> None:
    """Run from elsewhere (no ``workers`` to find), every module of the library still imports."""
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "governance").rglob("*.py")
        if path.name != "__main__.py"
    )
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    imported = subprocess.run(
        [sys.executable, "-c", script, *(m.removesuffix(".__init__") for m in modules)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "GOVERNANCE_CONFIG_PATH": str(tmp_path / "none.yaml")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
