"""The commands the README and docs show parse: every ``sparse-lens ...`` command against the CLI's
parser (flags generated from the config dataclasses), and every benchmark command
(``python benchmarks/x.py ...``, ``python -m benchmarks.x ...``) against that script's own
parser, run up to its ``parse_args`` and stopped there. A flag renamed or dropped, or a
command written with a flag that never existed, fails here."""

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND = re.compile(r"^(?:sparse-lens |python3? (?:-m benchmarks\.\w+|benchmarks/\w+\.py))")


def shown_commands() -> list[tuple[str, str]]:
    """``(page, command)`` of every command in inline code or on a line of a code block."""
    found = set()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        candidates = re.findall(r"`([^`\n]+)`", text) + [line.strip().removeprefix("$ ") for line in text.splitlines()]
        for candidate in candidates:
            command = candidate.split(" #")[0].strip().rstrip("\\").strip()
            if COMMAND.match(command) and "..." not in command:
                found.add((page.name, command))
    return sorted(found)


COMMANDS = shown_commands()


def test_the_scan_finds_the_commands():
    commands = [command for _, command in COMMANDS]
    assert any(command.startswith("sparse-lens trace") for command in commands)
    assert any("benchmarks/model.py" in command for command in commands)
    assert len(commands) > 20


class Parsed(Exception):
    """Raised in place of running a benchmark once its arguments are parsed."""


def parse_benchmark(argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run the benchmark script ``argv[0]`` (a path or ``-m module``) up to its ``parse_args``."""
    if argv[0] == "-m":
        path, argv = ROOT / (argv[1].replace(".", "/") + ".py"), argv[2:]
    else:
        path, argv = ROOT / argv[0], argv[1:]

    def parse_args(self, args=None, namespace=None):
        namespace, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        raise Parsed(namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.syspath_prepend(str(ROOT))
    with pytest.raises(Parsed) as parsed:
        runpy.run_path(str(path), run_name="__main__")
    return parsed.value.args[0]


@pytest.mark.parametrize("page, command", COMMANDS)
def test_a_shown_command_parses(page, command, monkeypatch, capsys, tmp_path):
    argv = shlex.split(command)
    if "--text" in argv:  # the reader's own document: give it one
        monkeypatch.chdir(tmp_path)
        (tmp_path / argv[argv.index("--text") + 1]).write_text("A document of my own.", encoding="utf-8")
    try:
        if argv[0] == "sparse-lens":
            from sparse_lens.cli.main import build_parser

            if "--help" in argv:
                with pytest.raises(SystemExit) as exited:
                    build_parser()[0].parse_args(argv[1:])
                assert exited.value.code == 0
            else:
                build_parser()[0].parse_args(argv[1:])
        else:
            parse_benchmark(argv[1:], monkeypatch)
    except SystemExit as error:  # argparse's usage error
        pytest.fail(f"{page}: `{command}` does not parse: {capsys.readouterr().err.strip()} ({error})")
