"""Helpers that connect gem_kernels to model libraries (``transformers``: see ``.transformers``)."""
