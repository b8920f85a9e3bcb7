"""Sphinx configuration of hesslens's reference documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The API pages (``docs/api/``) are written at every build from the ``__all__`` of the modules in
:data:`API_PAGES`, so that the reference always lists the public API as the code has it; each
object is documented once, on the first page that exports it. The examples in
``docs/examples`` are run by sphinx-gallery at every build (``docs/auto_examples/``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "src"))  # this checkout's package, installed or not

import hesslens  # noqa: E402

project = "hesslens"
author = "the hesslens authors"
copyright = "2026, the hesslens authors"
version = release = hesslens.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
]
exclude_patterns = ["_build", "examples", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json"]
html_theme = "furo"
html_title = f"hesslens {release}"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = True  # a few docstrings use its Parameters / Returns sections
napoleon_use_rtype = False
try:  # the Lightning callback's page; lightning comes with the "test" extra, not "docs"
    import lightning  # noqa: F401
except ImportError:
    autodoc_mock_imports = ["lightning"]

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # run every example
    "abort_on_example_error": True,
    "write_computation_times": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "capture_repr": (),  # the examples' prints, not the value of each cell's last line
}

#: One API page per module: (module, title, what it holds). An object several modules export
#: is documented on the first of them; the later pages name it and link there.
API_PAGES = [
    ("hesslens", "hesslens: the top-level API",
     "What ``import hesslens as hl`` gives: the curvature operators and their results, the "
     "Hessian-trace penalty, the curvature tracker and the errors."),
    ("hesslens.curvature", "hesslens.curvature: operators on a model",
     "The Hessian, the Gauss-Newton matrix and its residual as operators on a model and its "
     "data, and the layers they are split into."),
    ("hesslens.curvature.blocks", "hesslens.curvature.blocks: groupings of parameters",
     "Blocks of parameters (a module's, a glob's, slices of a fused weight) and the "
     "transformer preset."),
    ("hesslens.linalg", "hesslens.linalg: estimators on any symmetric operator",
     "Lanczos top-k, trace estimators (Hutchinson, Hutch++, per block) and stochastic Lanczos "
     "quadrature, on any symmetric matrix-vector product; no knowledge of networks."),
    ("hesslens.analysis", "hesslens.analysis: the layer study",
     "Spectra of the full Hessian and of every layer's block, how alike they are, and the "
     "Gauss-Newton split of each."),
    ("hesslens.training", "hesslens.training: penalty, trainer, callbacks",
     "The Hessian-trace penalty, SAM, and the trainer behind ``hesslens train`` with the "
     "context it gives its callbacks."),
    ("hesslens.integrations.hf", "hesslens.integrations.hf: transformers.Trainer",
     "Curvature during ``transformers.Trainer`` training."),
    ("hesslens.integrations.lightning", "hesslens.integrations.lightning: Lightning",
     "Curvature during Lightning training."),
]


def _directive(obj: object) -> str:
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if inspect.isroutine(obj):
        return "autofunction"
    return "autodata"  # constants, and type aliases such as ``dict[str, ...]``


def write_api_pages(app: object = None) -> list[str]:
    """Write ``docs/api/<module>.rst`` for every page of :data:`API_PAGES`; returns their
    names."""
    out = DOCS / "api"
    out.mkdir(exist_ok=True)
    seen: dict[int, str] = {}
    names = []
    for module_name, title, about in API_PAGES:
        module = importlib.import_module(module_name)
        public = [n for n in getattr(module, "__all__", []) if not n.startswith("_")]
        lines = [title, "=" * len(title), "", f".. module:: {module_name}", "", about, ""]
        elsewhere = []
        for name in public:
            obj = getattr(module, name)
            if id(obj) in seen and not isinstance(obj, (str, int, float, tuple, dict)):
                elsewhere.append(f":obj:`{seen[id(obj)]}`")
                continue
            seen[id(obj)] = f"{module_name}.{name}"
            lines += [f".. {_directive(obj)}:: {module_name}.{name}"]
            if _directive(obj) == "autodata":
                lines += ["   :no-value:"]
            lines += [""]
        if elsewhere:
            lines += ["Also exported here: " + ", ".join(elsewhere) + ".", ""]
        (out / f"{module_name}.rst").write_text("\n".join(lines))
        names.append(module_name)
    return names


def _drop_type_docstrings(app: object, what: str, name: str, obj: object, options: object,
                          lines: list[str]) -> None:
    """A constant without a ``#:`` comment (or a type alias such as ``dict[str, ...]``) would
    be shown with its type's docstring (that of ``dict``, ``tuple``, ...): show none instead."""
    if what not in ("data", "attribute") or not lines:
        return
    for kind in (type(obj), getattr(obj, "__origin__", None)):
        own = inspect.getdoc(kind) if kind is not None else None
        if own and lines[0].strip() == own.splitlines()[0].strip():
            lines.clear()
            return


def setup(app: object) -> None:
    write_api_pages()
    app.connect("autodoc-process-docstring", _drop_type_docstrings)
