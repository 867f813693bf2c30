"""Experiments built on the core: each is a function taking a config and an output directory.

Submodules are imported on demand (``polyattn.experiments.theory``, ...), so
importing this package stays cheap.
"""
