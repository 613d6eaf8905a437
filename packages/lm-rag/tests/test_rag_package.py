"""The skeleton package installs alone on top of its lower layers and imports."""

import importlib.metadata

import lmstack.rag


def test_version_matches_distribution_metadata() -> None:
    assert lmstack.rag.__version__ == importlib.metadata.version("lmstack-rag")


def test_public_api_is_declared() -> None:
    assert isinstance(lmstack.rag.__all__, list)
    for public in lmstack.rag.__all__:
        assert hasattr(lmstack.rag, public)


def test_namespace_is_pep420() -> None:
    import lmstack

    # A PEP 420 namespace has no __file__: no distribution ships lmstack/__init__.py.
    assert getattr(lmstack, "__file__", None) is None
