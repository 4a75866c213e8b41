"""The shape of the package: imports point one way (no cycle, function bodies included), the configuration
and the command line's --help load without torch, functions stay small, and nothing leaves process-wide
state behind (matplotlib backend, environment, caches that grow without bound or race between threads)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import transferlab

PACKAGE = Path(transferlab.__file__).parent
MAX_FUNCTION_LINES = 60


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package modules it imports, from every Import/ImportFrom node (function bodies too)."""
    modules = {_module_name(p, root, package): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # "from pkg import sub" imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_sees_an_import_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    assert find_cycle(import_graph(pkg, "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg, "pkg")) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE, "transferlab")
    assert len(graph) > 30  # every module was found
    assert "transferlab.report.tables" in graph["transferlab.report.write"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_results_never_import_the_report():
    graph = import_graph(PACKAGE, "transferlab")
    for name, imports in graph.items():
        if name.startswith(("transferlab.experiment", "transferlab.training", "transferlab.io")):
            assert not {i for i in imports if i.startswith(("transferlab.report", "transferlab.cli",
                                                            "transferlab.api"))}, name


def test_nothing_imports_the_fronts():
    """The CLI and the server only call the Python API: nothing imports the CLI, only the API starts the
    server, and the server never imports the API or the CLI."""
    graph = import_graph(PACKAGE, "transferlab")
    for name, imports in graph.items():
        if name != "transferlab.__main__":  # `python -m transferlab` (what torchrun launches) is the CLI
            assert "transferlab.cli" not in imports, name
        if name != "transferlab.api" and not name.startswith("transferlab.serve"):
            assert not {i for i in imports if i.startswith("transferlab.serve")}, name
        if name.startswith("transferlab.serve"):
            assert not imports & {"transferlab.api", "transferlab.cli"}, name


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_functions_are_short_and_take_few_arguments():
    long, wide = [], []
    for path in PACKAGE.rglob("*.py"):
        for fn in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name}"
            start = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
            if fn.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                long.append(where)
            args = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg not in
                    ("self", "cls")]
            if len(args) > 7:
                wide.append(where)
    assert not long, f"longer than {MAX_FUNCTION_LINES} lines: {long}"
    assert not wide, f"more than 7 parameters: {wide}"


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_config_and_cli_help_import_without_torch():
    done = _fresh_python("""
        import contextlib, io, sys
        import transferlab.config, transferlab.options, transferlab.selection
        from transferlab.config import TrainConfig
        TrainConfig(data_dir="x").resolved()
        from transferlab.cli import main
        for argv in (["--help"], ["train", "--help"], ["experiment", "--help"], ["predict", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
                main(argv)
            assert "usage: transferlab" in out.getvalue(), argv
        heavy = sorted(m for m in ("torch", "torchvision", "timm", "matplotlib", "sklearn") if m in sys.modules)
        print("heavy:", heavy)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "heavy: []"


def test_the_decoder_and_run_records_import_without_torch():
    done = _fresh_python("""
        import sys
        import transferlab.data.decode, transferlab.data.discovery, transferlab.data.splits
        import transferlab.io.rundir, transferlab.io.expdir, transferlab.models.preprocessing
        print("torch" in sys.modules)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_drawing_every_figure_leaves_the_matplotlib_backend_alone(tmp_path):
    done = _fresh_python(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        from transferlab import plots
        out = {str(tmp_path)!r}
        plots.confusion_matrix_png([[3, 1], [0, 4]], ["a", "b"], out + "/cm.png")
        plots.class_distribution_png({{"train": {{"a": 3, "b": 4}}}}, out + "/dist.png")
        history = [{{"stage": "head", "epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "val_loss": None,
                     "val_acc": None}}]
        plots.training_curves_png(history, out + "/curves.png")
        chart = {{"labels": ["x"], "values": {{"accuracy": [0.9]}}, "errors": {{"accuracy": [None]}},
                  "reference": [False], "separators": []}}
        plots.comparison_png(chart, out + "/comparison.png")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg False"
    for name in ("cm", "dist", "curves", "comparison"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_drawn_from_several_threads_match_one_thread(tmp_path):
    from transferlab import plots

    counts = [{"train": {"threads": i, "others": 7}} for i in range(1, 9)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: plots.class_distribution_png(counts[i % 8], tmp_path / f"t{i}.png"), range(16)))
    plots._drawn.cache_clear()
    for i in range(8):
        plots.class_distribution_png(counts[i], tmp_path / f"s{i}.png")
    plots._drawn.cache_clear()
    for i in range(16):
        assert (tmp_path / f"t{i}.png").read_bytes() == (tmp_path / f"s{i % 8}.png").read_bytes()


def test_in_process_caches_are_bounded():
    from transferlab import plots
    from transferlab.features import FeatureCache
    from transferlab.io import digest

    assert digest._digest.cache_info().maxsize is not None
    assert plots._drawn.cache_info().maxsize is not None
    assert FeatureCache.MEMORY_BYTES > 0


def test_timm_offline_loading_leaves_no_environment_change(monkeypatch):
    from huggingface_hub import constants

    from transferlab.errors import TransferlabError
    from transferlab.models.backbones import create_backbone, hub_offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", "1")
    before = constants.HF_HUB_OFFLINE
    seen = []
    with hub_offline(True):
        seen.append(constants.HF_HUB_OFFLINE)
    assert seen == [True] and constants.HF_HUB_OFFLINE == before
    with pytest.raises(TransferlabError, match="not in the Hugging Face cache"):
        create_backbone("timm/resnet10t", "default")  # weights that are not cached here
    assert "HF_HUB_OFFLINE" not in os.environ
    assert constants.HF_HUB_OFFLINE == before
