import pytest

import sparse_lens as sl


@pytest.mark.parametrize("fields,error", [
    (dict(query_block=0), sl.BlockSizeError),
    (dict(key_block=-16), sl.BlockSizeError),
    (dict(query_block=48, key_block=64), sl.BlockSizeError),
    (dict(query_block=64.0), sl.BlockSizeError),
    (dict(top_k=0), sl.InvalidConfigError),
    (dict(top_k=2, sink_blocks=2, local_blocks=1), sl.InvalidConfigError),
    (dict(local_blocks=-1), sl.InvalidConfigError),
    (dict(mode="exact"), sl.InvalidConfigError),
    (dict(estimator="oracle"), sl.InvalidConfigError),
    (dict(beam=0), sl.InvalidConfigError),
    (dict(top_p=1.5), sl.InvalidConfigError),
    (dict(estimator="adaptive", top_k=4, min_blocks=5), sl.InvalidConfigError),
    (dict(representative_keys=0), sl.InvalidConfigError),
    (dict(key_block=16, representative_keys=32), sl.InvalidConfigError),
])
def test_invalid_configs_raise_named_errors(fields, error):
    with pytest.raises(error):
        sl.StreamConfig(**fields)


def test_valid_configs_and_replace():
    config = sl.StreamConfig(query_block=64, key_block=16, top_k=8, local_blocks=4)
    assert config.replace(top_k=6).top_k == 6 and config.top_k == 8
    with pytest.raises(sl.InvalidConfigError):
        config.replace(top_k=3)  # sink 1 + local 4 > 3
    assert config.estimator_kwargs()["key_block"] == 16


def test_every_named_error_is_exported():
    """Users catch errors by ``sl.<Name>``: every class of sparse_lens.errors is a top-level name."""
    import inspect

    import sparse_lens as sl
    from sparse_lens import errors

    classes = {name for name, obj in inspect.getmembers(errors, inspect.isclass) if obj.__module__ == errors.__name__}
    assert classes and classes <= set(sl.__all__)
    assert all(getattr(sl, name) is getattr(errors, name) for name in classes)
