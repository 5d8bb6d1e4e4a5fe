"""The public API is exactly what ``mergeprobe.__all__`` lists."""

import mergeprobe


def test_all_is_sorted_and_complete():
    public = sorted(
        name for name in vars(mergeprobe) if not name.startswith("_") and not _is_module(name)
    )
    assert mergeprobe.__all__ == sorted(mergeprobe.__all__)
    assert set(mergeprobe.__all__) - {"__version__"} == set(public)


def _is_module(name):
    import types

    return isinstance(getattr(mergeprobe, name), types.ModuleType)


def test_issue_names_exist():
    from mergeprobe import MergeProbeCallback, SignatureStore  # noqa: F401

    assert mergeprobe.__version__.count(".") == 2
