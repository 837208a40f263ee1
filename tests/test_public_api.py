"""The public surface: deliberate re-exports over a private ``qjax._src`` implementation."""

import ast
import importlib
import pathlib

import pytest

import qjax

PACKAGE = pathlib.Path(qjax.__file__).parent
PUBLIC_FILES = sorted(p for p in PACKAGE.rglob("*.py") if "_src" not in p.parts)
SRC_FILES = sorted((PACKAGE / "_src").rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[ast.ImportFrom | ast.Import]:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.ImportFrom, ast.Import))]


@pytest.mark.parametrize("path", PUBLIC_FILES, ids=_module_name)
def test_public_module_only_re_exports(path):
    """A public file defines nothing: a docstring, imports, ``__all__`` (and ``__version__``,
    the CLI entry point of ``qjax.train``)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] in (
                ["__all__"], ["__version__"]):
            continue
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        raise AssertionError(f"{_module_name(path)} line {node.lineno} defines something: "
                             f"{ast.unparse(node)[:80]}")


@pytest.mark.parametrize("path", PUBLIC_FILES, ids=_module_name)
def test_all_resolves_and_is_sorted_out(path):
    module = importlib.import_module(_module_name(path))
    names = module.__all__
    assert len(names) == len(set(names)), "duplicates in __all__"
    for name in names:
        assert hasattr(module, name), f"{module.__name__}.{name} in __all__ but missing"
        assert not name.startswith("_")


def test_top_level_hides_internals():
    for name in ("typed_sharding", "qdot", "gaussian_mse", "scale_shape", "format_from_name",
                 "Case", "classify", "row_block", "directory_bytes", "int8", "formats"):
        assert name not in qjax.__all__, name


@pytest.mark.parametrize("path", SRC_FILES, ids=_module_name)
def test_implementation_never_imports_the_public_facade(path):
    """``qjax._src`` imports only ``qjax._src`` (no import cycles through the facades)."""
    for node in _imports(path):
        mods = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        for mod in mods:
            if mod and mod.split(".")[0] == "qjax":
                assert mod.startswith("qjax._src"), f"{_module_name(path)} imports {mod}"


@pytest.mark.parametrize("path", SRC_FILES + PUBLIC_FILES, ids=_module_name)
def test_no_module_imports_another_modules_private_names(path):
    for node in _imports(path):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qjax"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{_module_name(path)} imports {private} from {node.module}"
