"""Package structure: one registry implementation, import layering, and a light ``import polyattn``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import polyattn
from polyattn.data import registry as data_registry
from polyattn.data.errors import DatasetError
from polyattn.models import pinnsformer
from polyattn.models import registry as model_registry
from polyattn.utils.registry import Registry

PACKAGE = Path(polyattn.__file__).resolve().parent
ROOT = PACKAGE.parent


# --- the registry ---------------------------------------------------------------------------------
def test_registry_registers_gets_and_lists():
    reg: Registry = Registry("widget")

    @reg.register("b", size=2)
    def b():
        return "b"

    reg.register("a")(len)
    assert reg.get("b") is b and reg.get("a") is len
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg and ["unhashable"] not in reg
    assert dict(reg.entry("b").meta) == {"size": 2} and reg.entry("b").name == "b"
    with pytest.raises(TypeError):
        reg.entry("b").meta["size"] = 3  # shared by every lookup: read-only
    assert reg.pop("a") is len and reg.names() == ["b"]


def test_registry_unknown_name_suggests_close_names_and_lists_known_ones():
    reg: Registry = Registry("widget", error=KeyError, hint="(or 'x:<anything>')")
    for name in ("vit_micro", "vit_tiny", "deit_base"):
        reg.register(name)(object())
    with pytest.raises(KeyError, match=r"unknown widget 'vit_mirco' \(did you mean 'vit_micro'"):
        reg.get("vit_mirco")
    with pytest.raises(KeyError) as e:
        reg.get("resnet")
    assert "did you mean" not in str(e.value)
    assert "known widgets: deit_base, vit_micro, vit_tiny (or 'x:<anything>')" in str(e.value)
    with pytest.raises(KeyError, match=r"unknown widget \['a'\]"):
        reg.get(["a"])  # type: ignore[arg-type]


def test_registry_rejects_a_second_object_under_a_taken_name():
    reg: Registry = Registry("widget")
    reg.register("a")(len)
    reg.register("a")(len)  # the same object again (a re-imported module) is fine
    with pytest.raises(ValueError, match=r"widget 'a' is already registered \(by builtins\)"):
        reg.register("a")(abs)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("")


def test_models_datasets_and_pinn_models_share_the_registry():
    assert isinstance(model_registry._MODELS, Registry)
    assert isinstance(data_registry._DATASETS, Registry)
    assert isinstance(pinnsformer.PINN_MODELS, Registry)
    assert pinnsformer.PINN_MODELS.names() == ["mlp", "pinnsformer"]
    assert data_registry._DATASETS.entry("digits").meta["defaults"] == {
        k: v for k, v in data_registry.dataset_defaults("digits").items() if k not in data_registry.COMMON_DATA_KEYS
    }
    with pytest.raises(DatasetError, match=r"unknown dataset 'digit' \(did you mean 'digits'\?\)"):
        data_registry.build_dataset({"name": "digit"}, 0)
    with pytest.raises(ValueError, match=r"unknown model 'vit_mirco' \(did you mean 'vit_micro'\?\).*timm:"):
        model_registry.create_model("vit_mirco")
    with pytest.raises(ValueError, match=r"unknown PINN model 'mpl' \(did you mean 'mlp'\?\)"):
        pinnsformer.build_pinn_model("mpl")


# --- import layering ------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth, including ``import_module("...")``.

    ``from pkg import name`` yields both ``pkg`` and ``pkg.name``, since ``name`` may be a submodule.
    ``module`` is the file's dotted name when it is not a file of the package.
    """
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            found.add(node.args[0].value)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_import_resolution_of_the_checker(tmp_path):
    # The layering tests pass vacuously if the checker resolves imports to the wrong names.
    source = tmp_path / "mod.py"
    source.write_text(
        "import os.path\n"
        "from . import sibling\n"
        "from ..utils.io import atomic_save\n"
        "def later():\n"
        "    from ...cli import main\n"
        "    importlib.import_module('polyattn.commands.train')\n"
    )
    assert _imports(source, module="polyattn.core.backends.mod") == {
        "os.path",
        "polyattn.core.backends",
        "polyattn.core.backends.sibling",
        "polyattn.core.utils.io",
        "polyattn.core.utils.io.atomic_save",
        "polyattn.cli",
        "polyattn.cli.main",
        "polyattn.commands.train",
    }
    assert {"polyattn.core.layers", "polyattn.models._checks"} <= _imports(PACKAGE / "models" / "pinnsformer.py")


def test_core_imports_nothing_of_polyattn_outside_core():
    bad = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _package_files()
        if _within(_module_name(path), "polyattn.core")
        for name in _imports(path)
        if _within(name, "polyattn") and not _within(name, "polyattn.core")
    }
    assert not bad, "polyattn.core must stand alone:\n" + "\n".join(sorted(bad))


def test_only_the_cli_imports_the_commands():
    allowed = {"polyattn.cli"}
    bad = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _package_files()
        if _module_name(path) not in allowed and not _within(_module_name(path), "polyattn.commands")
        for name in _imports(path)
        if _within(name, "polyattn.commands")
    }
    assert not bad, "only polyattn/cli.py and the commands may import polyattn.commands:\n" + "\n".join(sorted(bad))


# What the commands need, not the library: none of it may load with ``import polyattn``.
HEAVY = ("matplotlib", "sklearn", "tqdm", "yaml", "timm", "torchvision", "PIL")


def test_import_polyattn_loads_no_command_dependencies():
    # torch itself imports tqdm when it is installed (torch.hub's download bar), so what torch
    # loaded is dropped first: only a module that polyattn's import brings back counts.
    code = (
        "import sys, numpy, torch\n"
        f"HEAVY = {HEAVY!r}\n"
        "for m in [m for m in sys.modules if m.split('.')[0] in HEAVY]:\n"
        "    del sys.modules[m]\n"
        "import polyattn\n"
        "polyattn.attention, polyattn.PolyAttention, polyattn.patch, polyattn.create_model\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"import polyattn loaded {out.stdout.strip()}"


def test_a_grid_worker_loads_neither_the_compiler_stack_nor_scikit_learn():
    # What a spawned compare worker imports and runs before its first step: a second each for
    # torch's compiler stack (dynamo, sympy) and scikit-learn, on every worker and CLI call.
    code = (
        "import sys\n"
        "import polyattn.experiments.compare, polyattn.training.trainer\n"
        "from polyattn.data.digits import load_digits_tensors\n"
        "load_digits_tensors()\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"a worker loaded {out.stdout.strip()}"
