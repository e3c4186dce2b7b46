"""The bottom layer: small rules every other package shares, each with one home.

Nothing here imports another part of the package (tests/test_architecture.py checks it).
"""

__all__: list = []  # nothing re-exported: import the module that owns the rule (`common.files`, ...)
