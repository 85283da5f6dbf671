"""Sphinx configuration: numpydoc docstrings, autosummary API pages, a gallery of the examples.

Offline by design: the build fetches nothing and the pages load nothing from the network.

- Math: ``sphinx-mathjax-offline`` (a pip package in the ``docs`` extra) ships MathJax 3 and copies
  it into ``_build/html/_static/mathjax``, so ``pip install -e ".[docs]"`` reproduces it on a fresh
  machine. We chose it over copying Debian's libjs-mathjax (not installable by pip, so a fresh
  machine would lack it) and over ``sphinx.ext.imgmath`` (needs a LaTeX installation, hundreds of
  MB, in CI).
- Theme: ``pydata-sphinx-theme``; its icon links and version switcher would need the network, so
  none are configured.
- Gallery: ``sphinx-gallery`` runs every ``examples/*.py`` (each takes about a second) and renders
  its printed output and figures with matplotlib's Agg backend, which sphinx-gallery selects itself.
"""

import databalance

project = "databalance"
author = "The databalance developers"
copyright = "The databalance developers"
release = databalance.__version__
version = release
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # the package's import name has hyphens; it sets mathjax_path
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip"]
nitpicky = False

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    # Run every script, not only plot_*.py, but parquet_raking.py (it writes files and needs dask) and the
    # two PyTorch examples (the docs build does not install torch; tests/test_examples.py runs them).
    "filename_pattern": r"^(?!.*(parquet_raking|swav_self_labelling|contrastive_training)\.py$).*\.py$",
    "capture_repr": (),  # show what the scripts print, not the value of their last expression
    "download_all_examples": False,
    "remove_config_comments": True,
    "write_computation_times": False,
    "show_memory": False,
    "plot_gallery": "True",
    "reference_url": {},
    "within_subsection_order": "FileNameSortKey",
}

html_theme = "pydata_sphinx_theme"
html_title = f"databalance {release}"
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "secondary_sidebar_items": ["page-toc"],
    "header_links_before_dropdown": 5,
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"auto_examples/index": []}
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["custom.css"]
