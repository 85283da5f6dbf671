import os

from hypothesis import settings

settings.register_profile("default", max_examples=60, deadline=None)
# CI runs the same examples every time: a red build is reproducible, never a lucky draw.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "default"))
