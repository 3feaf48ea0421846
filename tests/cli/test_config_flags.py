"""Flags generated from the config dataclasses (sparse_lens/cli/config_flags.py) and the commands
that use them: every field is a flag, typed and documented, and what the flags say is the config
the command builds."""

import argparse
from dataclasses import dataclass, field, fields
from typing import Literal

import pytest

import sparse_lens as sl
from sparse_lens.cli import fidelity as fidelity_cli
from sparse_lens.cli import trace as trace_cli
from sparse_lens.cli.config_flags import (
    FIXED,
    add_config_flags,
    config_values,
    docstring_attributes,
    flag_name,
    parse_field,
    registered_settings,
)
from sparse_lens.cli.main import build_parser


@dataclass(frozen=True)
class Toy:
    """A config with one field of each kind.

    Attributes:
        count: How many. Second sentence not shown.
        rate: A rate
            spread over two lines.
        name: Ignored: metadata wins.
    """

    count: int = 3
    rate: float = 0.5
    name: str = field(default="a", metadata={"help": "the name"})
    flag: bool = True
    cap: int | None = None
    kind: Literal["x", "y"] = "x"
    nested: dict | None = None  # no command-line form: no flag


def toy_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    add_config_flags(parser, Toy, **kwargs)
    return parser


def test_every_field_becomes_a_typed_flag_with_its_default_and_help():
    parser = toy_parser()
    assert Toy(**config_values(Toy, parser.parse_args([]))) == Toy()
    args = parser.parse_args(["--count", "7", "--rate", "0.25", "--name", "b", "--no-flag", "--cap", "9",
                              "--kind", "y"])
    assert Toy(**config_values(Toy, args)) == Toy(count=7, rate=0.25, name="b", flag=False, cap=9, kind="y")
    assert parser.parse_args(["--cap", "none"]).cap is None
    for bad in (["--count", "1.5"], ["--kind", "z"], ["--rate", "many"]):
        with pytest.raises((SystemExit, argparse.ArgumentError)):  # (exit_on_error=False: the latter)
            parser.parse_args(bad)
    text = parser.format_help()
    assert "How many (default: 3)" in text and "Second sentence" not in text
    assert "A rate spread over two lines (default: 0.5)" in text and "the name (default: a)" in text


def test_a_field_without_a_command_line_form_gets_no_flag():
    parser = toy_parser()
    assert "--nested" not in parser.format_help() and not hasattr(parser.parse_args([]), "nested")
    assert Toy(**config_values(Toy, parser.parse_args([]))).nested is None


def test_exclude_defaults_overrides_and_fixed_values():
    parser = toy_parser(exclude=["kind"], defaults={"count": 5}, overrides={"rate": {"type": float, "help": "mine"}})
    args = parser.parse_args([])
    assert not hasattr(args, "kind") and args.count == 5 and "mine" in parser.format_help()
    assert config_values(Toy, args, count=1)["count"] == 1  # the command's fixed values win


def test_docstring_attributes_of_the_real_config():
    helps = docstring_attributes(sl.TracingConfig)
    assert set(helps) == {f.name for f in fields(sl.TracingConfig)}
    assert helps["top_k"].startswith("Key blocks kept per query block")


def test_parse_field_types_like_the_flags_and_names_unknown_fields():
    assert parse_field(sl.AdaptiveSettings, "top_p", "0.8") == 0.8
    assert parse_field(sl.TracingConfig, "causal_selection", "False") is False
    assert parse_field(sl.TracingConfig, "observe_max_tokens", "none") is None
    assert parse_field(sl.TracingConfig, "backend", "triton") == "triton"
    with pytest.raises(ValueError):
        parse_field(sl.TracingConfig, "backend", "cuda")
    with pytest.raises(KeyError, match="no field 'topp'"):
        parse_field(sl.AdaptiveSettings, "topp", "0.8")


def test_benchmark_config_strings_read_fields_as_the_flags_do():
    from benchmarks.common import parse_config

    config = parse_config("adaptive:16:128:top_p=0.9:causal_selection=false:rescore_search=bounds")
    assert (config.estimator, config.query_block, config.top_k) == ("adaptive", 16, 128)
    assert config.estimator_settings == sl.AdaptiveSettings(top_p=0.9, rescore_search="bounds")
    assert config.causal_selection is False
    assert (config.sink_blocks, config.local_blocks, config.keep_qk) == (1, 1, False)  # the harness's defaults
    config = parse_config("rescored:64:15:local_blocks=0:keep_qk=true")  # ... which a field overrides
    assert (config.sink_blocks, config.local_blocks, config.keep_qk) == (1, 0, True)


@pytest.mark.parametrize("command", ["trace", "fidelity"])
def test_every_config_and_settings_field_is_a_flag_of_both_commands(command):
    _, commands = build_parser()
    flags = {option for action in commands[command]._actions for option in action.option_strings}
    shared = {f.name for f in fields(sl.TracingConfig)} - set(FIXED) - {"estimator_settings"}
    own = {f.name for cls in registered_settings().values() for f in fields(cls)}
    assert own >= {"beam", "top_p", "min_blocks", "representative_keys", "antidiagonal_stride"}
    for name in shared | own:
        assert flag_name(name) in flags, name
    assert not {flag_name(name) for name in FIXED} & flags and "--estimator-settings" not in flags
    # Today's flags keep their names.
    assert {"--query-block", "--key-block", "--top-k", "--sink-blocks", "--local-blocks", "--estimator"} <= flags


FLAGS = ["--query-block", "32", "--key-block", "16", "--top-k", "9", "--sink-blocks", "2", "--local-blocks", "3",
         "--estimator", "adaptive", "--top-p", "0.8", "--min-blocks", "5", "--representative-keys", "4",
         "--rescore-search", "bounds", "--rescore-query-stride", "4", "--no-causal-selection", "--backend", "reference"]


def test_what_the_flags_say_is_the_config_the_commands_build():
    parser, _ = build_parser()
    expected = sl.TracingConfig(
        query_block=32, key_block=16, top_k=9, sink_blocks=2, local_blocks=3, estimator="adaptive",
        estimator_settings=sl.AdaptiveSettings(top_p=0.8, min_blocks=5, representative_keys=4, rescore_search="bounds",
                                               rescore_query_stride=4),
        causal_selection=False, backend="reference", keep_qk=False)
    assert fidelity_cli.fidelity_config(parser.parse_args(["fidelity", *FLAGS])) == expected
    assert trace_cli.trace_config(parser.parse_args(["trace", *FLAGS]), top_k=9) == expected
    beam = fidelity_cli.fidelity_config(parser.parse_args(["fidelity", "--beam", "2"]))  # the default estimator's
    assert beam.estimator == "rescored" and beam.estimator_settings == sl.RescoredSettings(beam=2)
    trace_defaults = trace_cli.trace_config(parser.parse_args(["trace"]), top_k=4)
    assert (trace_defaults.query_block, trace_defaults.key_block, trace_defaults.estimator) == (16, 16, "rescored")
    assert trace_defaults.estimator_settings == sl.RescoredSettings()


@pytest.mark.parametrize("command", ["trace", "fidelity"])
@pytest.mark.parametrize("arguments, message", [
    (["--estimator", "adaptive", "--top-k", "4", "--min-blocks", "8"], "min_blocks"),
    (["--top-p", "0.8"], "--top-p: not a setting of estimator 'rescored' (it takes --beam"),
    (["--estimator", "stream", "--beam", "2"], "--beam: not a setting of estimator 'stream'"),
])
def test_a_config_the_flags_cannot_make_is_a_usage_error_before_the_model_loads(command, arguments, message,
                                                                                  monkeypatch, capsys):
    from sparse_lens.cli.main import main

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(fidelity_cli, "load_model", no_loading)
    monkeypatch.setattr(sl.HookedSparseTransformer, "from_pretrained", no_loading)
    with pytest.raises(SystemExit) as exited:
        main([command, *arguments, "--device", "cpu"])
    assert exited.value.code == 2 and message in capsys.readouterr().err
