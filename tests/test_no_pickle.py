"""Nothing in the package or the benchmarks can unpickle: no pickle-family imports, no allow_pickle=True, no np.load
without allow_pickle=False, no pd.read_pickle / torch.load / joblib.load. Scanned with ast, reported as file:line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("stages", "benchmarks")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
# callables that unpickle whatever they are given, whatever their arguments
UNPICKLING_CALLS = {"read_pickle", "to_pickle", "torch.load", "joblib.load", "pickle.load", "pickle.loads",
                    "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "shelve.open",
                    "marshal.load", "marshal.loads", "pandas.read_pickle", "pd.read_pickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def problems_in(source: str, name: str) -> list[str]:
    """Every unpickling construct of one source file, as ``name:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.ImportFrom) and any(a.name in ("read_pickle", "load") and
                                                      (node.module or "").split(".")[0] in ("pandas", "torch")
                                                      for a in node.names):
            found.append(f"{where}: imports an unpickling loader from {node.module}")
        elif isinstance(node, ast.Call):
            called = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if called in UNPICKLING_CALLS or called.endswith((".read_pickle", ".to_pickle")):
                found.append(f"{where}: calls {called}")
            pickle_flag = keywords.get("allow_pickle")
            if pickle_flag is not None and not (isinstance(pickle_flag, ast.Constant) and pickle_flag.value is False):
                found.append(f"{where}: {called or 'a call'} with allow_pickle not False")
            if (called in ("np.load", "numpy.load") or called.endswith(".numpy.load")) and pickle_flag is None:
                found.append(f"{where}: {called} without allow_pickle=False")
        elif isinstance(node, ast.Attribute) and node.attr in ("read_pickle", "loads") and \
                _dotted(node.value) in PICKLE_MODULES:
            found.append(f"{where}: refers to {_dotted(node)}")
    return sorted(set(found), key=lambda line: (line.split(":")[0], int(line.split(":")[1])))


def scanned_files() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))


def test_nothing_in_the_package_or_benchmarks_can_unpickle():
    files = scanned_files()
    assert any(path.name == "checkpoints.py" for path in files)  # the scan sees the package
    found = [line for path in files for line in problems_in(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("import pickle\n", "imports pickle"),
        ("import cloudpickle as cp\n", "imports cloudpickle"),
        ("from dill import loads\n", "imports from dill"),
        ("import joblib\njoblib.load('x')\n", "calls joblib.load"),
        ("import numpy as np\nnp.load('x.npz')\n", "np.load without allow_pickle=False"),
        ("import numpy as np\nnp.load('x.npz', allow_pickle=True)\n", "allow_pickle not False"),
        ("import numpy as np\nflag = True\nnp.load('x.npz', allow_pickle=flag)\n", "allow_pickle not False"),
        ("import pandas as pd\npd.read_pickle('x')\n", "calls pd.read_pickle"),
        ("import pandas\ndf = pandas.DataFrame()\ndf.to_pickle('x')\n", "calls df.to_pickle"),
        ("import torch\ntorch.load('x.pt')\n", "calls torch.load"),
        ("from torch import load\n", "imports an unpickling loader from torch"),
        ("import numpy\nnumpy.load('x.npy')\n", "numpy.load without allow_pickle=False"),
    ],
)
def test_each_unpickling_construct_is_named_with_its_line(source, fragment):
    """Each probe has its offending construct on its last line: the finding names that line."""
    found = problems_in(source, "probe.py")
    last_line = source.count("\n")
    assert any(fragment in entry and entry.startswith(f"probe.py:{last_line}:") for entry in found), found


def test_safe_loading_passes():
    source = ("import numpy as np\nimport json\nnp.load('x.npz', allow_pickle=False)\njson.loads('{}')\n"
              "import msgpack\nmsgpack.unpackb(b'')\n")
    assert problems_in(source, "probe.py") == []
