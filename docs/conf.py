"""Sphinx configuration: `make docs` builds docs/_build/html with warnings as errors.

Math is rendered in the browser by KaTeX, bundled with sphinxcontrib-katex and copied into
the build, as MathML (which browsers draw with their own fonts): nothing is fetched from the
network at build or view time.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "jxent"
author = "The jxent Authors"
copyright = "2026, The jxent Authors"  # noqa: A001

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxcontrib.katex",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
master_doc = "index"
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# KaTeX: local JavaScript (from the package), MathML output, no stylesheet from a CDN.
katex_css_path = "katex-local.css"
katex_options = "output: 'mathml', throwOnError: true"
katex_prerender = False

html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {
    "description": "Information theory and cross-entropy losses for JAX",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_title = "jxent"
