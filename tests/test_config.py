import dataclasses
import pickle

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
    (dict(estimator="no_such_estimator"), sl.InvalidConfigError),
    (dict(backend="cuda"), sl.InvalidConfigError),
    (dict(keep_qk="no"), sl.InvalidConfigError),
    (dict(top_k=2, sink_blocks=2, local_blocks=0), sl.InvalidConfigError),  # causal: the band leaves no room
    (dict(estimator="rescored", estimator_settings=sl.AdaptiveSettings()), sl.InvalidConfigError),
    (dict(estimator="adaptive", top_k=4, estimator_settings=sl.AdaptiveSettings(min_blocks=5)), sl.InvalidConfigError),
    (dict(key_block=16, estimator_settings=sl.RescoredSettings(representative_keys=32)), sl.InvalidConfigError),
])
def test_invalid_configs_raise_named_errors(fields, error):
    with pytest.raises(error):
        sl.TracingConfig(**fields)


@pytest.mark.parametrize("settings,fields", [
    (sl.RescoredSettings, dict(beam=0)),
    (sl.RescoredSettings, dict(rescore_search="exhaustive")),
    (sl.AdaptiveSettings, dict(top_p=1.5)),
    (sl.AdaptiveSettings, dict(min_blocks=0)),
    (sl.StreamSettings, dict(representative_keys=0)),
    (sl.AntidiagonalSettings, dict(antidiagonal_stride=0)),
])
def test_invalid_estimator_settings_raise_named_errors(settings, fields):
    with pytest.raises(sl.InvalidConfigError):
        settings(**fields)


def test_valid_configs_geometry_and_replace():
    config = sl.TracingConfig(query_block=64, key_block=16, top_k=8, local_blocks=4)
    assert config.geometry == sl.BlockGeometry(64, 16, 8, 1, 4)
    assert config.replace(top_k=6).top_k == 6 and config.top_k == 8
    with pytest.raises(sl.InvalidConfigError):
        config.replace(top_k=3)  # sink 1 + local 4 > 3
    assert config.estimator_kwargs()["geometry"].key_block == 16
    assert config.estimator_settings == sl.RescoredSettings()  # None becomes the estimator's defaults
    # a new estimator gets its own defaults, keeping the settings both have
    strided = config.replace(estimator_settings=sl.RescoredSettings(rescore_query_stride=4, beam=2))
    adaptive = strided.replace(estimator="adaptive")
    assert adaptive.estimator_settings == sl.AdaptiveSettings(rescore_query_stride=4)
    assert strided.replace(estimator="bounds").estimator_settings == sl.EstimatorSettings()
    assert pickle.loads(pickle.dumps(adaptive)) == adaptive
    assert config.replace(**strided.fields_dict()) == strided


def test_to_dict_is_flat_with_the_estimators_own_settings():
    config = sl.TracingConfig(estimator="adaptive", estimator_settings=sl.AdaptiveSettings(top_p=0.8))
    flat = config.to_dict()
    assert flat["top_p"] == 0.8 and flat["estimator"] == "adaptive" and "beam" not in flat
    assert "estimator_settings" not in flat


def test_stream_config_is_a_deprecated_alias_that_builds_the_same_config():
    with pytest.warns(DeprecationWarning, match=r"AdaptiveSettings\(top_p=0.8, rescore_query_stride=2\)"):
        old = sl.StreamConfig(estimator="adaptive", top_k=8, top_p=0.8, rescore_query_stride=2, beam=3)
    new = sl.TracingConfig(estimator="adaptive", top_k=8,
                           estimator_settings=sl.AdaptiveSettings(top_p=0.8, rescore_query_stride=2))
    assert old == new and type(old) is sl.TracingConfig and isinstance(new, sl.StreamConfig)
    with pytest.warns(DeprecationWarning, match="TracingConfig"):
        assert sl.StreamConfig() == sl.TracingConfig()
    # flat settings of another estimator are validated, as the flat config did, then ignored
    with pytest.raises(sl.InvalidConfigError), pytest.warns(DeprecationWarning):
        sl.StreamConfig(top_p=1.5)
    with pytest.raises(sl.InvalidConfigError), pytest.warns(DeprecationWarning):
        sl.StreamConfig(estimator="adaptive", top_k=4, min_blocks=5)
    # the former flat reads and replace keep working, with a warning
    with pytest.warns(DeprecationWarning, match="estimator_settings.top_p"):
        assert new.top_p == 0.8
    with pytest.warns(DeprecationWarning):
        assert new.beam == 4  # the former default: adaptive has no beam
    with pytest.warns(DeprecationWarning, match="AdaptiveSettings"):
        assert new.replace(top_p=0.9).estimator_settings.top_p == 0.9
    with pytest.raises(AttributeError):
        new.no_such_field  # noqa: B018


def test_every_named_error_is_exported():
    """Users catch errors by ``sl.<Name>``: every class of sparse_lens.errors is a top-level name."""
    import inspect

    import sparse_lens as sl
    from sparse_lens import errors

    classes = {name for name, obj in inspect.getmembers(errors, inspect.isclass) if obj.__module__ == errors.__name__}
    assert classes and classes <= set(sl.__all__)
    assert all(getattr(sl, name) is getattr(errors, name) for name in classes)


def test_config_dataclasses_are_plain():
    # command-line flags are generated from these fields: each has a default and a help line
    for item in dataclasses.fields(sl.TracingConfig):
        assert item.default is not dataclasses.MISSING and item.metadata.get("help"), item.name


def test_the_alias_remembers_flat_settings_for_a_later_estimator_as_the_flat_config_did():
    with pytest.warns(DeprecationWarning):
        config = sl.StreamConfig(top_k=3, min_blocks=2, top_p=0.7, representative_keys=4)
    assert config.estimator_settings == sl.RescoredSettings(representative_keys=4)
    adaptive = config.replace(estimator="adaptive")  # what model.stream_settings(estimator=...) does
    assert adaptive.estimator_settings == sl.AdaptiveSettings(min_blocks=2, top_p=0.7, representative_keys=4)
    with pytest.warns(DeprecationWarning):
        assert config.top_p == 0.7


def test_adaptive_warns_when_min_blocks_leaves_top_p_no_effect():
    # min_blocks = top_k (the CLI's auto top_k of 4 at CPU lengths, the default min_blocks 4): every row
    # keeps top_k blocks whatever top_p says, which ran without a word before
    with pytest.warns(UserWarning, match="top_p=0.5 has no effect"):
        sl.TracingConfig(estimator="adaptive", top_k=4, estimator_settings=sl.AdaptiveSettings(top_p=0.5))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sl.TracingConfig(estimator="adaptive", top_k=8)  # top_p can act: no warning


@pytest.mark.parametrize("estimator", sl.ESTIMATORS)
def test_from_dict_reads_what_to_dict_wrote(estimator):
    config = sl.TracingConfig(query_block=32, key_block=16, top_k=9, estimator=estimator, mode="observe")
    changed = {"rescored": dict(beam=2), "adaptive": dict(top_p=0.8, min_blocks=2), "stream": dict(representative_keys=4),
               "antidiagonal": dict(antidiagonal_stride=4)}.get(estimator)
    if changed:
        config = config.replace(estimator_settings=dataclasses.replace(config.estimator_settings, **changed))
    assert sl.TracingConfig.from_dict(config.to_dict()) == config


def test_from_dict_refuses_names_it_does_not_know():
    with pytest.raises(sl.InvalidConfigError, match="top_p"):
        sl.TracingConfig.from_dict({"estimator": "rescored", "top_p": 0.8})
    with pytest.raises(sl.InvalidConfigError, match="topk"):
        sl.TracingConfig.from_dict({"topk": 8})


def test_replace_with_an_unknown_field_is_a_named_error():
    """A mistyped field (``topk=``) in replace / stream_settings names the config's fields instead of
    a bare dataclass TypeError."""
    with pytest.raises(sl.InvalidConfigError, match=r"no field\(s\) \[.topk.\].*.top_k."):
        sl.TracingConfig().replace(topk=4)
    assert sl.TracingConfig().replace(top_k=4).top_k == 4


def test_a_key_block_below_the_default_representative_keys_names_the_setting_to_pass():
    # Key blocks of 4 keys with the default 8 representative keys: the user never set them, so the
    # error says which settings class takes a smaller value (and that value then works).
    with pytest.raises(sl.InvalidConfigError, match=r"default is 8.*RescoredSettings\(representative_keys=\.\.\.\)"):
        sl.TracingConfig(query_block=4, key_block=4, top_k=4, estimator="rescored")
    config = sl.TracingConfig(query_block=4, key_block=4, top_k=4, estimator="rescored",
                              estimator_settings=sl.RescoredSettings(representative_keys=4))
    assert config.estimator_settings.representative_keys == 4
