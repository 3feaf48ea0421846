"""One-way dependencies and public seams.

- The kernels, the pattern and the data import nothing from the TransformerLens layer.
- No module of the package (nor a benchmark script) imports another module's private
  (underscore) name: what crosses a module boundary is public, named and documented.
  Tests may import the private helpers of the module they test.
- Nothing imports TransformerLens' private modules or names (``transformer_lens.*._*``): the
  bridge is built through ``transformer_lens.model_bridge.sources.build_bridge_from_module``.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_kernels_import_without_transformer_lens():
    code = "import sys, sparse_lens.kernels, sparse_lens.pattern, sparse_lens.data; print('transformer_lens' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def is_private(part: str) -> bool:
    return part.startswith("_") and not part.endswith("__")


def private_imports(source: str, package: str, own_module: str | None = None) -> list[str]:
    """``module:name`` of every import from ``package`` of a private module or name (a dotted
    part or an imported name starting with ``_``, dunders excepted), other than from ``own_module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules, names = [node.module], [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            modules, names = [alias.name for alias in node.names], []
        else:
            continue
        for module in modules:
            if module.split(".")[0] != package or module == own_module:
                continue
            if any(is_private(part) for part in module.split(".")[1:]):
                found.append(module)
            found += [f"{module}:{name}" for name in names if is_private(name)]
    return found


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_the_scan_catches_private_imports():
    assert private_imports("from sparse_lens.data.niah import _format, NOISE_LINE", "sparse_lens") == [
        "sparse_lens.data.niah:_format"]
    assert private_imports("from sparse_lens.kernels._x import f\nimport sparse_lens._y", "sparse_lens") == [
        "sparse_lens.kernels._x", "sparse_lens._y"]
    assert private_imports("from transformer_lens.model_bridge.sources._bridge_builder import configure_tokenizer",
                           "transformer_lens") == ["transformer_lens.model_bridge.sources._bridge_builder"]
    assert private_imports("from sparse_lens.a import _b", "sparse_lens", own_module="sparse_lens.a") == []
    assert private_imports("from sparse_lens import __version__\nfrom sparse_lens.kernels import num_blocks",
                           "sparse_lens") == []


@pytest.mark.parametrize("folder", ["sparse_lens", "benchmarks"])
def test_no_module_imports_another_modules_private_names(folder):
    offenders = {module_name(path): found for path in python_files(folder)
                 if (found := private_imports(path.read_text(encoding="utf-8"), "sparse_lens", module_name(path)))}
    assert not offenders, f"private names imported across modules (make them public or move them): {offenders}"


def test_nothing_imports_transformer_lens_private_modules_or_names():
    offenders = {str(path.relative_to(ROOT)): found for path in python_files("sparse_lens", "benchmarks", "tests")
                 if (found := private_imports(path.read_text(encoding="utf-8"), "transformer_lens"))}
    assert not offenders, f"TransformerLens private imports (use its public API): {offenders}"


def test_subpackages_are_attributes_imported_on_first_use():
    # `import sparse_lens as sl; sl.analysis` works without `import sparse_lens.analysis`, and
    # `import sparse_lens` alone still imports neither the analyses nor TransformerLens.
    code = ("import sys, sparse_lens as sl; before = 'sparse_lens.analysis' in sys.modules or 'transformer_lens' in "
            "sys.modules; print(before, callable(sl.analysis.route_to_needle), sl.report.write_report.__name__, "
            "'analysis' in dir(sl))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "write_report", "True"]
    import sparse_lens as sl

    with pytest.raises(AttributeError):
        sl.no_such_subpackage


def test_the_fidelity_function_and_its_module_have_different_names():
    # sparse_lens.analysis.fidelity is the function; its module is fidelity_metrics. The old module
    # path still imports every name, with a DeprecationWarning, and never replaces the function.
    import importlib

    import sparse_lens as sl
    import sparse_lens.analysis.fidelity_metrics as metrics

    assert sl.analysis.fidelity is metrics.fidelity is sl.fidelity and callable(sl.analysis.fidelity)
    assert sl.collect_dense is metrics.collect_dense
    import sparse_lens.analysis.dense_trace as dense_trace  # the dense side, split out: old paths re-export it

    for name in ("DenseTrace", "collect_dense", "model_fingerprint", "check_logits_fit"):
        assert getattr(metrics, name) is getattr(dense_trace, name)
    with pytest.warns(DeprecationWarning, match="sparse_lens.analysis.fidelity_metrics.DenseTrace"):
        from sparse_lens.analysis.fidelity import DenseTrace
    assert DenseTrace is metrics.DenseTrace
    importlib.import_module("sparse_lens.analysis.fidelity")
    assert callable(sl.analysis.fidelity)


DEPRECATED_MODULES = ("sparse_lens.analysis.fidelity", "sparse_lens.cli.trace_report",  # shims kept one release
                      *(f"sparse_lens.kernels.{old}" for old in ("search_ref", "oneshot_ref", "rescore_ref", "estimator_ref",
                                                                  "estimator_triton", "sparse_attention_ref", "dense_ref")))


def test_the_package_imports_no_deprecated_module_path():
    # (``from sparse_lens.analysis import fidelity`` is the function: only module paths count.)
    offenders = {}
    for path in python_files("sparse_lens"):
        if module_name(path) in DEPRECATED_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                       [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            found = [module for module in modules if module in DEPRECATED_MODULES]
            if found and module_name(path) != "sparse_lens.analysis.__init__":  # it loads the shim first, on purpose
                offenders.setdefault(module_name(path), []).extend(found)
    assert not offenders, f"modules importing a deprecated path (import the new module): {offenders}"
