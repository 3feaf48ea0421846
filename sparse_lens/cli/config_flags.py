"""Command-line flags generated from the config dataclasses.

Every field of a config dataclass becomes one flag, spelled as the field with dashes
(``top_k`` -> ``--top-k``), typed from its annotation (``int``, ``float``, ``str``, ``bool`` ->
``--flag / --no-flag``, ``X | None`` -> also ``none``, ``Literal[...]`` -> choices), with the field's
default and its help: ``field(metadata={"help": ...})``, else the field's entry in the class
docstring's ``Attributes:`` section. Fields with no command-line form (a nested dataclass such as
``TracingConfig.estimator_settings``) are skipped. A command only names the fields it fixes itself
(``exclude``), its own defaults and the few flags it types differently (``overrides``); a field
added to a config becomes a flag of every command with no change here.

An estimator's own settings (one small dataclass per estimator, from the registry) become flags
too (:func:`add_settings_flags`); a settings flag is only taken when given, and belongs to the
estimators whose settings have that field: ``--top-p`` with ``--estimator rescored`` is an error
rather than silently ignored (:func:`config_from_flags`).

The same typing parses the ``field=value`` parts of the benchmarks' compact config strings
(:func:`parse_field`), so the command line and the benchmarks read a field the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Callable, Iterable, Mapping

NONE = "none"  # how an optional field is set to None on the command line


def flag_name(field_name: str) -> str:
    """``top_k`` -> ``--top-k``."""
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(annotation, False)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1 and len(members) < len(typing.get_args(annotation)):
            return members[0], True
    return annotation, False


def field_parser(annotation: Any) -> tuple[Callable[[str], Any], tuple | None]:
    """The argparse ``type=`` and ``choices`` of a field annotated ``annotation``."""
    inner, optional = _unwrap_optional(annotation)
    choices = None
    if typing.get_origin(inner) is typing.Literal:
        choices = typing.get_args(inner)
        convert: Callable[[str], Any] = type(choices[0]) if choices else str
    elif inner is bool:
        convert = _boolean
    elif inner in (int, float, str):
        convert = inner
    else:
        raise TypeError(f"no command-line form for a field annotated {annotation!r}")
    if not optional:
        return convert, choices

    def parse(text: str) -> Any:
        return None if text.strip().lower() == NONE else convert(text)

    parse.__name__ = f"{getattr(convert, '__name__', 'value')} or {NONE}"  # argparse names the type in errors
    return parse, (choices + (None,) if choices else None)


def has_flag(annotation: Any) -> bool:
    """Whether a field annotated ``annotation`` has a command-line form."""
    try:
        field_parser(annotation)
    except TypeError:
        return False
    return True


def _boolean(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.strip().lower() not in words:
        raise ValueError(f"not a boolean: {text!r}")
    return words[text.strip().lower()]


_boolean.__name__ = "boolean"


def docstring_attributes(cls: type) -> dict[str, str]:
    """``{field: first sentence}`` from the ``Attributes:`` section of ``cls``'s docstring (Google style)."""
    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)*)", doc, flags=re.MULTILINE)
    if not section:
        return {}
    entries = re.findall(r"^[ \t]{4}(\w+)(?: \([^)]*\))?:[ \t]*(.*(?:\n[ \t]{8,}.*)*)", section.group(1), re.MULTILINE)
    return {name: _first_sentence(" ".join(text.split())) for name, text in entries}


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?\.)(?:\s|$)", text)
    return (match.group(1) if match else text).rstrip(".")


def config_fields(*classes: type) -> dict[str, tuple[type, dataclasses.Field, Any]]:
    """``{name: (class, field, type)}`` of the fields of ``classes`` (dataclasses), in order; a field
    name in several classes is taken from the first."""
    found: dict[str, tuple[type, dataclasses.Field, Any]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.init and field.name not in found:
                found[field.name] = (cls, field, hints[field.name])
    return found


def field_help(cls: type, field: dataclasses.Field) -> str:
    """The field's ``metadata["help"]``, else its docstring entry, else '' (reST literals unquoted,
    ``%`` escaped for argparse)."""
    text = field.metadata.get("help") or docstring_attributes(cls).get(field.name, "")
    return text.replace("``", "").replace("%", "%%")


def add_config_flags(
    parser: argparse.ArgumentParser,
    *classes: type,
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "configuration",
) -> argparse._ArgumentGroup:
    """Add one flag per field of the dataclasses ``classes`` to ``parser`` (in an argument group
    named ``title``), except the fields in ``exclude``.

    Args:
        defaults: ``{field: default}`` replacing the dataclass's default for this command.
        overrides: ``{field: add_argument keyword arguments}`` replacing the generated ones
            (e.g. a stricter ``type=`` or ``choices=``); ``help`` given there is used as is.

    Returns:
        The argument group (its flags' ``dest`` are the field names). Fields without a
        command-line form (see :func:`has_flag`) get no flag.
    """
    defaults, overrides, excluded = dict(defaults or {}), dict(overrides or {}), set(exclude)
    group = parser.add_argument_group(title)
    for name, (cls, field, annotation) in config_fields(*classes).items():
        if name in excluded or not has_flag(annotation):
            continue
        default = defaults.get(name, field.default if field.default is not dataclasses.MISSING else None)
        options: dict[str, Any] = {"dest": name, "default": default}
        if _unwrap_optional(annotation)[0] is bool and "type" not in overrides.get(name, {}):
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"], choices = field_parser(annotation)
            if choices is not None:
                options["choices"] = choices
        options.update(overrides.get(name, {}))
        if "help" not in overrides.get(name, {}):
            text = field_help(cls, field)
            options["help"] = f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        group.add_argument(flag_name(name), **options)
    return group


def config_values(cls: type, args: argparse.Namespace, **fixed: Any) -> dict[str, Any]:
    """The keyword arguments of ``cls`` read from parsed flags (the fields present in ``args``),
    with ``fixed`` taking precedence."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
              if field.init and hasattr(args, field.name) and has_flag(typing.get_type_hints(cls)[field.name])}
    return {**values, **fixed}


def add_settings_flags(
    parser: argparse.ArgumentParser, settings: Mapping[str, type], *, title: str = "estimator settings",
) -> argparse._ArgumentGroup:
    """Add one flag per field of the settings dataclasses ``settings`` (``{estimator name:
    its settings class}``), a field shared by several estimators once. A settings flag has no
    default in ``args`` (it is only set when given); its help names the estimators that have it
    and their default."""
    group = parser.add_argument_group(title)
    owners: dict[str, list[str]] = {}
    for estimator, cls in settings.items():
        for field in dataclasses.fields(cls):
            owners.setdefault(field.name, []).append(estimator)
    classes = list(dict.fromkeys(settings.values()))
    for name, (cls, field, annotation) in config_fields(*classes).items():
        if not has_flag(annotation):
            continue
        defaults = {repr(getattr(each(), name)) for each in classes if name in {f.name for f in dataclasses.fields(each)}}
        default = defaults.pop() if len(defaults) == 1 else "the estimator's"
        text = field_help(cls, field)
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                   "help": f"{text} (estimator {', '.join(owners[name])}; default {default})"}
        if _unwrap_optional(annotation)[0] is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"], choices = field_parser(annotation)
            if choices is not None:
                options["choices"] = choices
        group.add_argument(flag_name(name), **options)
    return group


def config_from_flags(config_cls: type, settings: Mapping[str, type], args: argparse.Namespace, *,
                      selector: str = "estimator", settings_field: str = "estimator_settings", **fixed: Any) -> Any:
    """``config_cls`` built from parsed flags: its own fields (:func:`config_values`, ``fixed``
    winning), and in ``settings_field`` the settings of the estimator named by ``selector``, built
    from the settings flags given (its defaults for the others).

    Raises:
        InvalidConfigError: a settings flag given that the chosen estimator does not have, or
            any value the config or settings refuse.
    """
    from sparse_lens.errors import InvalidConfigError

    values = config_values(config_cls, args, **fixed)
    name = values[selector]
    if name not in settings:
        raise InvalidConfigError(f"{selector} must be one of {tuple(settings)}, got {name!r}.")
    chosen = settings[name]
    given = {field: getattr(args, field) for cls in dict.fromkeys(settings.values())
             for field in (f.name for f in dataclasses.fields(cls)) if hasattr(args, field)}
    own = {f.name for f in dataclasses.fields(chosen)}
    foreign = sorted(set(given) - own)
    if foreign:
        takes = ", ".join(flag_name(field) for field in sorted(own)) or "no settings"
        raise InvalidConfigError(
            f"{', '.join(flag_name(field) for field in foreign)}: not a setting of {selector} {name!r} "
            f"(it takes {takes}).")
    return config_cls(**values, **{settings_field: chosen(**given)})


def parse_field(cls: type, name: str, text: str) -> Any:
    """The value of field ``name`` of dataclass ``cls`` written as ``text``, typed as its flag is.

    Raises:
        KeyError: ``cls`` has no field ``name``.
        ValueError: ``text`` is not a value of the field's type or choices.
    """
    fields = config_fields(cls)
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no field {name!r} (fields: {', '.join(fields)})")
    convert, choices = field_parser(fields[name][2])
    value = convert(text)
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {text!r}")
    return value


# ----- the tracing config: what both commands use ---------------------------------------------------
FIXED = {"mode": "sparse", "keep_qk": False}  # TracingConfig fields the commands set themselves (no flags)


def registered_settings() -> dict[str, type]:
    """``{estimator name: its settings dataclass}``, from the estimator registry."""
    from sparse_lens.kernels.registry import REGISTRY

    return {name: entry.settings for name, entry in REGISTRY.items()}


def add_tracing_flags(parser: argparse.ArgumentParser, *, defaults: Mapping[str, Any] | None = None,
                      overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """The flags of ``TracingConfig`` (but ``FIXED``) and of every registered estimator's
    settings; ``--estimator`` chooses among the registered names."""
    from sparse_lens.config import TracingConfig

    settings = registered_settings()
    overrides = dict(overrides or {})
    overrides["estimator"] = {"choices": tuple(settings), **overrides.get("estimator", {})}
    add_config_flags(parser, TracingConfig, exclude=FIXED, defaults=defaults, overrides=overrides,
                     title="sparse attention (TracingConfig)")
    add_settings_flags(parser, settings, title="estimator settings (TracingConfig.estimator_settings)")


def tracing_config(args: argparse.Namespace, **fixed: Any) -> Any:
    """The ``TracingConfig`` the flags describe, with ``FIXED`` and ``fixed`` (e.g. a resolved
    ``top_k``) taking precedence (:func:`config_from_flags`)."""
    from sparse_lens.config import TracingConfig

    return config_from_flags(TracingConfig, registered_settings(), args, **{**FIXED, **fixed})
