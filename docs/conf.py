"""Sphinx configuration: numpydoc docstrings, autosummary API pages, figures from the reproduction."""

import databalance

project = "databalance"
author = "The databalance developers"
release = databalance.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.mathjax", "numpydoc"]
autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
