"""Turn the references written in sparse_lens' docstrings and pages into checked links.

Docstrings and pages name code in two ways: Sphinx roles (``:func:`name```,
``:class:`~sparse_lens.pattern.BlockSparsePattern```) and code spans holding a full dotted path
(``sparse_lens.kernels.stream_estimate``). Both become autorefs cross-references, so that
``mkdocs build --strict`` fails when one names nothing (a renamed or removed function, module or
class). Role targets without a dot path are looked up from the docstring's own scope, as Sphinx
does.

The docstrings are also made readable as Markdown without editing them: a list that follows a
paragraph line gets the blank line Markdown needs before it; a Google-style entry documenting
several names at once (``query, key: ...``, as napoleon accepts) becomes one entry per name; an
RST ``text::`` literal-block marker becomes ``text:``.

Used twice by mkdocs.yml: as a griffe extension (``CodeRefs``, for docstrings) and as a mkdocs
hook (``on_page_markdown``, for the pages under docs/).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

PACKAGE = "sparse_lens"
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|obj|data|exc|const):`(~?)([A-Za-z_][\w.]*)`")
CODE_PATH = re.compile(r"(?<![\[`])(``?)(" + PACKAGE + r"(?:\.[A-Za-z_]\w*)+)\1(?!`)")
FENCE = re.compile(r"^\s*(```|~~~)")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")
RST_LITERAL = re.compile(r"(\S)::$", re.MULTILINE)
SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Attributes|Other Parameters|Keyword Args):\s*$")
SHARED_ENTRY = re.compile(r"^(\s+)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+): (.*)$")


def _lazy_names(package: griffe.Module) -> dict[str, str]:
    """``sparse_lens._LAZY``: names the package imports on first use, and their modules."""
    try:
        return ast.literal_eval(str(package["_LAZY"].value))
    except (KeyError, ValueError, SyntaxError):
        return {}


def canonical(package: griffe.Module, path: str) -> str:
    """The path under which mkdocstrings documents ``path`` (re-exports lead to their definition);
    ``path`` itself if it names nothing, so that autorefs reports it."""
    parts = path.split(".")
    if parts[0] != package.name:
        return path
    lazy = _lazy_names(package)
    if len(parts) > 1 and parts[1] in lazy and parts[1] not in package.members:
        parts = [*lazy[parts[1]].split("."), *parts[1:]]
    try:
        obj = package[".".join(parts[1:])] if len(parts) > 1 else package
        return obj.final_target.path if isinstance(obj, griffe.Alias) else obj.path
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path


def _link(text: str, target: str) -> str:
    return f"[`{text}`][{target}]"


def _paragraph_lists(text: str) -> str:
    """Insert a blank line before a list that directly follows a paragraph line."""
    out: list[str] = []
    in_list = in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        is_item = not in_fence and bool(LIST_ITEM.match(line))
        if is_item and not in_list and out and out[-1].strip():
            out.append("")
        if is_item:
            in_list = True
        elif not line.strip() or not line.startswith((" ", "\t")):
            in_list = False
        out.append(line)
    return "\n".join(out)


def _shared_entries(text: str) -> str:
    """Google style ``a, b: description`` entries (one description for several parameters or
    attributes, as napoleon accepts) become one entry per name, which griffe understands."""
    lines, out, in_section, i = text.splitlines(), [], False, 0
    while i < len(lines):
        line = lines[i]
        if SECTION.match(line):
            in_section = True
        elif line.strip() and not line.startswith((" ", "\t")):
            in_section = False
        match = SHARED_ENTRY.match(line) if in_section else None
        if not match:
            out.append(line)
            i += 1
            continue
        indent, names, first = match.groups()
        block = [first]
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(indent):
            block.append(lines[i])
            i += 1
        for name in names.split(", "):
            out.append(f"{indent}{name}: {block[0]}")
            out.extend(block[1:])
    return "\n".join(out)


def _code_paths(text: str, package: griffe.Module) -> str:
    """Code spans holding a full ``sparse_lens.`` path become cross-references (outside fences)."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            line = CODE_PATH.sub(lambda m: _link(m.group(2), canonical(package, m.group(2))), line)
        out.append(line)
    return "\n".join(out)


class CodeRefs(griffe.Extension):
    """Griffe extension: rewrite every docstring of the package as described in the module docstring."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name == PACKAGE:
            self._rewrite(pkg, pkg, seen=set())

    def _rewrite(self, obj: griffe.Object, package: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._docstring(obj, obj.docstring.value, package)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member, package, seen)

    @staticmethod
    def _docstring(obj: griffe.Object, text: str, package: griffe.Module) -> str:
        def role(match: re.Match) -> str:
            short, name = match.group(1), match.group(2)
            path = name
            if not name.startswith(PACKAGE + "."):
                try:
                    path = obj.resolve(name)
                except griffe.NameResolutionError:
                    path = f"{obj.module.path}.{name}"  # autorefs reports it
            return _link(name.rsplit(".", 1)[-1] if short else name, canonical(package, path))

        text = ROLE.sub(role, text)
        text = _code_paths(text, package)
        text = _shared_entries(text)
        text = RST_LITERAL.sub(r"\1:", text)  # "text::" introduces a literal block in RST
        return _paragraph_lists(text)


_package: griffe.Module | None = None


def on_page_markdown(markdown: str, *, config: Any, **kwargs: Any) -> str:
    """mkdocs hook: in the pages, code spans naming ``sparse_lens.`` objects become cross-references."""
    global _package
    if PACKAGE + "." not in markdown:
        return markdown
    if _package is None:
        root = str(Path(config.config_file_path).resolve().parent)
        _package = griffe.load(PACKAGE, search_paths=[root], resolve_aliases=True, resolve_external=False)
    return _code_paths(markdown, _package)
