"""Griffe extension: render the package's reStructuredText roles as Markdown.

Docstrings name other objects with Sphinx roles (``:class:`Pipeline```,
``:func:`~pipeopt.sinks.write_batches```) and open literal blocks with
``::``. mkdocstrings reads Markdown, so each role becomes an optional
cross-reference (a link where the target is documented, plain code where it
is not) and each ``::`` a colon before an indented code block.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data|obj):`(?P<body>[^`]+)`")
_LITERAL = re.compile(r"(?m)(?<=\S)::$")
_BARE_LITERAL = re.compile(r"(?m)^[ \t]*::[ \t]*$")


def _target(obj: griffe.Object, name: str) -> str | None:
    """Return the full path ``name`` refers to in ``obj``'s scope, if it resolves."""
    if name.startswith("pipeopt."):
        return name
    head, _, rest = name.lstrip(".").partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            path = scope.resolve(head)
        except (griffe.NameResolutionError, griffe.AliasResolutionError):
            scope = scope.parent
            continue
        return f"{path}.{rest}" if rest else path
    return None


def _link(obj: griffe.Object, match: re.Match[str]) -> str:
    body = match.group("body").strip()
    title, _, explicit = body.partition(" <")
    if explicit:
        name, shown = explicit.rstrip(">"), title
    else:
        name = body.lstrip("~")
        shown = name.rsplit(".", 1)[-1] if body.startswith("~") else name
    code = f"<code>{html.escape(shown)}</code>"
    target = _target(obj, name)
    if target is None:
        return code
    return f'<autoref identifier="{html.escape(target)}" optional>{code}</autoref>'


def convert(obj: griffe.Object, text: str) -> str:
    """Return ``text`` with roles as cross-references and ``::`` blocks as Markdown."""
    text = _ROLE.sub(lambda match: _link(obj, match), text)
    text = _BARE_LITERAL.sub("", text)
    return _LITERAL.sub(":", text)


class RstRoles(griffe.Extension):
    """Convert every docstring of a loaded package once it is complete."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the docstrings of ``pkg`` and everything inside it."""
        todo: list[griffe.Object] = [pkg]
        while todo:
            obj = todo.pop()
            if obj.docstring is not None:
                obj.docstring.value = convert(obj, obj.docstring.value)
            todo.extend(member for member in obj.members.values() if not member.is_alias)
