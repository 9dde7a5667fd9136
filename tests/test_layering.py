"""Imports point one way: kernels <- ops <- selectors <- optim <- the rest <- the package root.

Every ``gem_kernels/**/*.py`` is parsed (nothing is imported), and every import of a gem_kernels
module in it, absolute or relative, at module level or inside a function, must name a module of
the importer's own layer or of a lower one. A module the map below does not place fails the
test: place a new module in ``LAYER_OF`` (a package's entry places everything under it, so a new
file in ``backends/`` is a kernel, one in ``optim/`` is optim).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gem_kernels"

LAYERS = ("kernels", "ops", "selectors", "optim", "rest", "root")

# Module -> layer. An entry also places every module under it, except the root's entry, which
# places ``gem_kernels/__init__.py`` only.
LAYER_OF = {
    "gem_kernels._C": "kernels",              # the compiled kernels
    "gem_kernels.library": "kernels",         # the operators and register_kernel
    "gem_kernels.reference": "kernels",       # the specification
    "gem_kernels.backends": "kernels",        # every backend, each file registering its kernels
    "gem_kernels.weight_grad_dispatch": "kernels",  # which weight gradient: a measured table
    "gem_kernels.ops": "ops",
    "gem_kernels.dtensor": "ops",             # generic DTensor helpers
    "gem_kernels.selectors": "selectors",
    "gem_kernels.sharded": "selectors",       # the selection's ops over row-sharded tensors
    "gem_kernels.optim": "optim",
    "gem_kernels.nn": "rest",
    "gem_kernels.delta": "rest",
    "gem_kernels.peft_export": "rest",
    "gem_kernels.distributed": "rest",
    "gem_kernels.integrations": "rest",
    "gem_kernels": "root",                    # the public API: imports from every layer
}

# Names of the root package a lower module may import: constants ``__init__.py`` binds before
# it imports any gem_kernels module (``test_root_constants_come_first`` checks it), so that
# importing them runs nothing of the package.
ROOT_CONSTANTS = {"__version__"}


def layer_of(module: str):
    """The layer of a dotted module name, or None when the map does not place it."""
    if module in LAYER_OF:
        return LAYER_OF[module]
    parts = module.split(".")
    for n in range(len(parts) - 1, 1, -1):  # the enclosing packages, never the root's entry
        layer = LAYER_OF.get(".".join(parts[:n]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether a dotted gem_kernels name is a module (a file, a package or a compiled
    extension) rather than a name bound inside one."""
    if name in LAYER_OF:
        return True
    path = ROOT.joinpath(*name.split("."))
    return (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
            or any(path.parent.glob(path.name + ".*.so")) or any(path.parent.glob(path.name + ".*.pyd")))


def _from_source(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` statement imports from."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _from_imports(node: ast.ImportFrom, package: str) -> list:
    source = _from_source(node, package)
    if not (source == "gem_kernels" or source.startswith("gem_kernels.")):
        return []
    text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
    out = []
    for alias in node.names:
        if is_module(f"{source}.{alias.name}"):
            out.append((node.lineno, f"{source}.{alias.name}", text))
        elif not (source == "gem_kernels" and alias.name in ROOT_CONSTANTS):
            out.append((node.lineno, source, text))
    return out


def imported_modules(path: Path) -> list:
    """``[(line, module, what)]``: each gem_kernels module ``path`` imports, with the import's
    text for the message. ``from package import name`` imports ``package.name`` when that is a
    module, else ``package`` (or, for the root's constants, nothing of the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, f"import {alias.name}") for alias in node.names
                    if alias.name == "gem_kernels" or alias.name.startswith("gem_kernels.")]
        elif isinstance(node, ast.ImportFrom):
            out += _from_imports(node, package)
    return list(dict.fromkeys(out))  # one entry per module an import statement names


def violations(paths) -> list:
    problems = []
    for path in paths:
        importer = module_name(path)
        own = layer_of(importer)
        where = path.relative_to(ROOT)
        if own is None:
            problems.append(f"{where}: module {importer} has no layer; add it to the layer map "
                            "(LAYER_OF in tests/test_layering.py)")
            continue
        for line, module, text in imported_modules(path):
            layer = layer_of(module)
            if layer is None:
                problems.append(f"{where}:{line}: `{text}` imports {module}, which has no layer; add "
                                "it to the layer map (LAYER_OF in tests/test_layering.py)")
            elif LAYERS.index(layer) > LAYERS.index(own):
                problems.append(f"{where}:{line}: `{text}`: {importer} ({own}) imports {module} "
                                f"({layer}), a higher layer")
    return problems


def _sources() -> list:
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_point_down():
    paths = _sources()
    assert len(paths) > 10
    problems = violations(paths)
    assert not problems, "imports against the layering " + " < ".join(LAYERS) + ":\n" + "\n".join(problems)


def test_root_constants_come_first():
    """``ROOT_CONSTANTS`` are bound in ``gem_kernels/__init__.py`` before its first import of a
    gem_kernels module, so a module importing one needs nothing above it."""
    body = ast.parse((PACKAGE / "__init__.py").read_text()).body
    bound = set()
    for node in body:
        if isinstance(node, ast.Assign):
            bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        if any(isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("gem_kernels"))
               or isinstance(n, ast.Import) and any(a.name.startswith("gem_kernels") for a in n.names)
               for n in ast.walk(node)):
            break
    assert ROOT_CONSTANTS <= bound


def _write(tmp_path, files: dict) -> list:
    paths = []
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths


def test_the_check_sees_each_kind_of_import(tmp_path, monkeypatch):
    """The checker on a made-up package: upward imports in each spelling are caught, with the
    file, line and import named; unplaced modules are caught; downward ones pass."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    paths = _write(tmp_path, {
        "gem_kernels/__init__.py": "__version__ = '0'\nfrom . import ops\n",
        "gem_kernels/ops.py": "from . import library\nfrom .reference import x\n",
        "gem_kernels/library.py": "def f():\n    from .optim import SparseAdamW\n",
        "gem_kernels/reference.py": "import gem_kernels.selectors\nx = 1\n",
        "gem_kernels/selectors.py": "from gem_kernels import ops, __version__\n",
        "gem_kernels/optim/__init__.py": "",
        "gem_kernels/optim/fsdp.py": "from ..distributed.sharded import ShardedOps\nfrom .. import newmod\n",
        "gem_kernels/backends/mps.py": "from ..library import register_kernel\nfrom .. import nn\n",
        "gem_kernels/distributed/__init__.py": "from ..optim import fsdp\n",
        "gem_kernels/distributed/sharded.py": "",
        "gem_kernels/nn.py": "from . import ops\n",
        "gem_kernels/newmod.py": "",
    })
    problems = violations(paths)
    text = "\n".join(problems)
    assert "gem_kernels/library.py:2: `from .optim import SparseAdamW`" in text  # in a function
    assert "gem_kernels/reference.py:1: `import gem_kernels.selectors`" in text  # absolute
    assert "gem_kernels/optim/fsdp.py:1: `from ..distributed.sharded import ShardedOps`" in text
    assert "imports gem_kernels.newmod, which has no layer" in text
    assert "module gem_kernels.newmod has no layer" in text
    assert "gem_kernels/backends/mps.py:2: `from .. import nn`: gem_kernels.backends.mps (kernels)" in text
    assert len(problems) == 6, text
    assert not any(p.startswith(("gem_kernels/__init__", "gem_kernels/ops", "gem_kernels/selectors",
                                 "gem_kernels/distributed", "gem_kernels/nn")) for p in problems)


# Where a flag that adds per-entry optimizer state lives (docs/ARCHITECTURE.md, "The one path
# from SparseAdamW.step() to a kernel"): its argument, the group's state keys, the dense groups'
# call of torch's AdamW, and the three kernels. The layers between carry the state as one list.
STATE_FLAG_FILES = {"gem_kernels/optim/sparse_adamw.py", "gem_kernels/optim/layout.py",
                    "gem_kernels/optim/phases.py", "gem_kernels/reference.py", "csrc/sparse_adamw.cpp",
                    "gem_kernels/backends/triton/sparse_adamw.py"}


def test_amsgrad_lives_in_the_six_files_of_a_state_flag():
    product = [p for d in ("gem_kernels", "gem_finetune", "csrc", "python")
               for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".cpp", ".h")]
    naming = {str(p.relative_to(ROOT)) for p in product
              if any(word in p.read_text().lower() for word in ("amsgrad", "max_exp_avg_sq"))}
    assert naming == STATE_FLAG_FILES, f"AMSGrad also named in {sorted(naming - STATE_FLAG_FILES)}; " \
                                       f"no longer in {sorted(STATE_FLAG_FILES - naming)}"
