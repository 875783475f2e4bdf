"""MkDocs hook: reference tables generated from the parser and from pyproject.toml.

``docs/reference/cli.md`` and ``docs/reference/environment.md`` hold a marker
comment each; at build time the marker is replaced by tables read from
``pipeopt.cli.build_parser()``: every command, argument, default, choice and
help text, and every ``$PIPEOPT_*`` variable the help texts name.
``<!-- extra-packages: NAME -->`` becomes the requirements of the extra
``NAME`` as pyproject.toml declares them (an unknown name fails the build).
Nothing is listed by hand, so the pages cannot drift from the code.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLI_MARKER = "<!-- cli-reference -->"
ENVIRONMENT_MARKER = "<!-- environment-reference -->"
_EXTRA = re.compile(r"<!-- extra-packages: (?P<name>[a-z0-9-]+) -->")
_VARIABLE = re.compile(r"\$?(PIPEOPT_[A-Z0-9_]+)")
_MARKDOWN_SPECIAL = re.compile(r"([\\*_\[\]|<>`])")


SRC = Path(__file__).resolve().parents[2] / "src"


def _parser() -> argparse.ArgumentParser:
    # The parser of the checked-out source, whatever pipeopt the build's interpreter has.
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from pipeopt.cli import build_parser  # noqa: PLC0415

    return build_parser()


def commands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """Yield ``(name, summary, parser)`` of every subcommand, in the order of ``--help``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, summaries.get(name, ""), sub


def _text(help_text: str) -> str:
    """Return a help text as Markdown: variables and options as code, the rest escaped."""
    parts = re.split(r"(\$?PIPEOPT_[A-Z0-9_*]+|--[a-z][a-z0-9-]*)", help_text)
    out = []
    for index, part in enumerate(parts):
        if index % 2:
            out.append(f"`{part}`")
        else:
            out.append(_MARKDOWN_SPECIAL.sub(r"\\\1", part))
    return "".join(out)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=88)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, "")
    return formatter.format_help().strip()


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
        return ""
    if action.default == []:
        return ""
    return f"`{action.default}`"


def _argument(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"`{option}`" for option in action.option_strings)
        if action.nargs != 0:
            names += f" `{action.metavar or action.dest.upper()}`"
        return names
    return f"`{action.metavar or action.dest}`"


def _help(action: argparse.Action) -> str:
    text = _text(action.help or "")
    if action.choices is not None:
        choices = ", ".join(f"`{choice}`" for choice in action.choices)
        text = f"{text} (one of {choices})" if text else f"one of {choices}"
    if action.nargs == "?" or (not action.option_strings and action.nargs == "?"):
        text += " (optional)"
    if isinstance(action, argparse._AppendAction | argparse._ExtendAction):
        text += " (repeatable)"
    return text


def _table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | description |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        rows.append(f"| {_argument(action)} | {_default(action)} | {_help(action)} |")
    return rows


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Return the Markdown of every command, its usage and its arguments."""
    parser = parser or _parser()
    lines = ["```text", _usage(parser), "```", ""]
    for action in parser._actions:
        if isinstance(action, argparse._VersionAction):
            lines += [f"`{', '.join(action.option_strings)}` prints the version and exits.", ""]
    for name, summary, sub in commands(parser):
        lines += [f"## pipeopt {name}", ""]
        if summary:
            lines += [_text(summary[0].upper() + summary[1:]) + ".", ""]
        if sub.description and sub.description.rstrip(".") != summary.rstrip("."):
            lines += [_text(sub.description), ""]
        lines += ["```text", _usage(sub), "```", "", *_table(sub), ""]
    return "\n".join(lines)


def variables(parser: argparse.ArgumentParser) -> dict[str, list[tuple[str, str, str]]]:
    """Return each ``PIPEOPT_*`` variable the help texts name: ``(command, option, help)``."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    for name, _, sub in commands(parser):
        for action in sub._actions:
            for variable in _VARIABLE.findall(action.help or ""):
                option = next(
                    (name for name in action.option_strings if name.startswith("--")), action.dest
                )
                found.setdefault(variable, []).append((name, option, action.help or ""))
    return dict(sorted(found.items()))


def environment_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Return the Markdown table of every ``PIPEOPT_*`` variable the commands read."""
    parser = parser or _parser()
    rows = ["| variable | stands for | commands | description |", "| --- | --- | --- | --- |"]
    for variable, uses in variables(parser).items():
        options = sorted({option for _, option, _ in uses})
        names = ", ".join(
            f"[`{name}`](cli.md#pipeopt-{name})"
            for name in dict.fromkeys(command for command, _, _ in uses)
        )
        # "...; $PIPEOPT_X" at the end of a help text repeats the row's own name.
        described = _text(re.sub(rf";\s*\${variable}(?=\)|$)", "", uses[0][2]))
        stands = ", ".join(f"`{option}`" for option in options)
        rows.append(f"| `{variable}` | {stands} | {names} | {described} |")
    return "\n".join(rows)


def extras() -> dict[str, list[str]]:
    """Return each extra of pyproject.toml and its requirements."""
    with (SRC.parent / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    return dict(project["optional-dependencies"])


def extra_packages(name: str, declared: dict[str, list[str]] | None = None) -> str:
    """Return the Markdown of an extra's install command and requirements.

    Raises:
        KeyError: pyproject.toml declares no extra ``name``.
    """
    declared = extras() if declared is None else declared
    if name not in declared:
        raise KeyError(f"pyproject.toml has no extra {name!r}; extras: {', '.join(declared)}")
    items = ", ".join(f"`{requirement}`" for requirement in declared[name])
    return f"`pip install 'pipeopt[{name}]'` installs {items}."


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the reference pages' markers (an MkDocs event)."""
    markdown = _EXTRA.sub(lambda match: extra_packages(match["name"]), markdown)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if ENVIRONMENT_MARKER in markdown:
        markdown = markdown.replace(ENVIRONMENT_MARKER, environment_reference())
    return markdown
