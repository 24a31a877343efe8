"""The layout's rules, checked on the code itself: services find carriers through the registry only.

A service importing a provider package would bring back what the provider SPI removed (carrier code in
five places, found three ways); the simulator and tests reach a carrier's side through
``registry.load_fake``. Adding a carrier must touch only its package and the registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROVIDERS = "voicebus.telephony.providers"
NO_PROVIDER_IMPORTS = [*sorted((ROOT / "services").glob("*/src")), ROOT / "cli" / "src", ROOT / "simulator" / "src"]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PROVIDERS):
            names.append(node.value)  # importlib.import_module("voicebus.telephony.providers...")
    return names


@pytest.mark.parametrize("src", NO_PROVIDER_IMPORTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_provider_package_is_imported_outside_libs_telephony(src: Path) -> None:
    files = sorted(src.rglob("*.py"))
    assert files, f"nothing to check under {src}"
    offenders = [f"{f.relative_to(ROOT)}: {name}" for f in files for name in _imports(f) if name.startswith(PROVIDERS)]
    assert offenders == []


def test_providers_import_no_other_provider() -> None:
    """A dialect several carriers share lives in telephony/dialects, not inside one carrier's package."""
    base = ROOT / "libs" / "telephony" / "src" / "voicebus" / "telephony" / "providers"
    packages = sorted(p for p in base.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert len(packages) >= 7
    offenders = []
    for pkg in packages:
        for f in pkg.rglob("*.py"):
            for name in _imports(f):
                if name.startswith(PROVIDERS + ".") and not name.startswith(f"{PROVIDERS}.{pkg.name}"):
                    offenders.append(f"{f.relative_to(ROOT)}: {name}")
    assert offenders == []
