"""The package's shape: no import cycles (function-local imports too), and configs that load
without jax, tfds, grain or orbax."""

import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jaxkd")


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph():
    """``{module: {jaxkd modules it imports anywhere in its body}}``."""
    paths = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    modules = {module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in candidates:
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                # A submodule importing its own package's __init__ is not an edge back.
                if target in modules and target != name and not name.startswith(target + "."):
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph):
    """A cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "jaxkd.train" in graph and "jaxkd.methods.pruning" in graph
    assert "jaxkd.teacher_logits" in graph["jaxkd.train"]  # the walk sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The checker finds a planted cycle.
    planted = {**graph, "jaxkd.schema": graph["jaxkd.schema"] | {"jaxkd.train"}}
    assert find_cycle(planted) is not None


LOAD_EVERY_CONFIG = r"""
import glob, importlib.util, os, sys
heavy = ("jax", "flax", "optax", "tensorflow_datasets", "orbax", "grain")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "configs", "*.py"))):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.get_config(None)
    module.get_config("smoke")
from jaxkd.config import parse_run, run_config
parse_run(run_config("mnist1d", "mlp"))
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""


def test_loading_every_config_imports_nothing_heavy():
    proc = subprocess.run([sys.executable, "-c", LOAD_EVERY_CONFIG, ROOT], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout
