"""One import root, and a CLI that starts without the model libraries."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

HEAVY = ("torch", "transformers", "nnsight", "matplotlib", "scipy", "sklearn", "numba")
#: Not imported by `sql ... "SELECT 1"`, a look at the small tables, or `store info` (docs/benchmarks.md, CLI start-up):
#: pyarrow with numpy costs as much as DuckDB and Delta Lake together; pyarrow.dataset imports pandas (0.2-0.9 s).
NOT_ON_LIGHT_PATHS = (
    "pyarrow", "pyarrow.dataset", "pyarrow.parquet", "pyarrow.compute", "numpy", "pandas", "pytz", "rich.progress",
    "hookpoints.store.tables", "hookpoints.store.schema", "hookpoints.store.neuron_sql",
    "hookpoints.store.neuron_surface",
)  # fmt: skip


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(out.split())


def test_cli_imports_no_model_library():
    loaded = _modules_after("import hookpoints.cli.main")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_light_commands_import_no_model_library():
    for argv in (["--help"], ["sql", "--help"], ["store", "info", "--help"]):
        loaded = _modules_after(
            f"from hookpoints.cli.main import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
        )
        assert not loaded & set(HEAVY), (argv, sorted(loaded & set(HEAVY)))
        assert not loaded & set(NOT_ON_LIGHT_PATHS), (argv, sorted(loaded & set(NOT_ON_LIGHT_PATHS)))


def test_wheel_holds_one_top_level_package(tmp_path):
    """A built wheel installs everything under ``hookpoints`` (store, analyses and cli folders included)."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hookpoints-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"hookpoints"}, tops
    for module in ("hookpoints/store/catalog.py", "hookpoints/analyses/ap.py", "hookpoints/cli/main.py"):
        assert module in names


def test_store_analyses_cli_are_subpackages():
    import hookpoints.analyses
    import hookpoints.cli
    import hookpoints.store

    assert hookpoints.store.__name__ == "hookpoints.store"
    assert Path(hookpoints.store.__file__).parent.name == "store"
    assert Path(hookpoints.cli.__file__).parent.name == "cli"


def test_import_hookpoints_imports_no_model_library():
    loaded = _modules_after("import hookpoints")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_every_public_name_resolves_and_shows_an_example():
    """``__all__`` is the API: each name loads (lazily) and its docstring carries a short example."""
    import hookpoints

    missing = []
    for name in hookpoints.__all__:
        if name == "__version__":
            continue
        value = getattr(hookpoints, name)
        doc = value.__doc__ or ""
        if ">>>" not in doc:
            missing.append(name)
    assert not missing, f"public names without a docstring example: {missing}"
    assert set(hookpoints.__all__) <= set(dir(hookpoints))
    try:
        hookpoints.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def test_store_commands_on_a_real_store_import_no_model_library(tmp_path):
    """``sql`` and ``store info`` over a store with a run: no torch, transformers, nnsight, sklearn, scipy, ..."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cli_startup", Path(__file__).resolve().parents[1] / "bench" / "cli_startup.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    store = bench.small_store(tmp_path / "store")
    sql = ["sql", "--store", store]
    queries = ["SELECT count(*) AS n FROM activations", "SELECT 1", "SELECT hook, shape FROM hooks WHERE width = 4"]
    for argv in ([*sql, queries[0]], [*sql, queries[1]], [*sql, queries[2]], ["store", "info", store]):
        out = subprocess.run(
            [sys.executable, "-c", "from hookpoints.cli.main import main\n"
             f"main({argv!r})\nimport sys; print('MODULES', ' '.join(sys.modules))"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        shown, modules = out.split("MODULES")
        loaded = set(modules.split())
        assert not loaded & set(HEAVY), (argv, sorted(loaded & set(HEAVY)))
        expected = {"store": "startup-run", queries[0]: "6", queries[1]: "1", queries[2]: "blocks.1.hook_resid_post"}
        assert expected[argv[0] if argv[0] == "store" else argv[-1]] in shown
        if "activations" not in argv[-1]:  # the big tables are Arrow datasets (pyarrow.dataset, pandas)
            assert not loaded & set(NOT_ON_LIGHT_PATHS), (argv, sorted(loaded & set(NOT_ON_LIGHT_PATHS)))
