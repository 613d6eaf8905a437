"""lmstack.eval: Benchmarks and evaluation.

This layer's features have not landed yet; the package installs, versions and
imports so that the stack's layout, layering and CI are real from day one.
"""

__version__ = "0.1.0"

__all__: list[str] = []
