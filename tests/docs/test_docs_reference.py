"""The reference pages cover what the code defines: commands, flags, variables, public names.

The command-line and environment pages are generated at build time by
``docs/_hooks/reference.py`` from the parser; these tests hold the generator
to every flag and to every ``PIPEOPT_*`` variable the package reads.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from pipeopt.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference"


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "docs_reference_hook", ROOT / "docs" / "_hooks" / "reference.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hook() -> ModuleType:
    return _hook()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_command_and_flag_is_in_the_cli_reference(hook: ModuleType) -> None:
    parser = build_parser()
    text = hook.cli_reference(parser)
    commands = _subparsers(parser)
    assert commands
    for name, sub in commands.items():
        section = text.split(f"## pipeopt {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"`{option}`" in section, f"pipeopt {name} {option}"
            if not action.option_strings:
                assert f"`{action.metavar or action.dest}`" in section, f"pipeopt {name}"
            assert action.help, f"pipeopt {name} {action.option_strings or action.dest}: no help"
    assert "`--version`" in text


def test_the_reference_pages_hold_the_markers(hook: ModuleType) -> None:
    assert hook.CLI_MARKER in (REFERENCE / "cli.md").read_text(encoding="utf-8")
    assert hook.ENVIRONMENT_MARKER in (REFERENCE / "environment.md").read_text(encoding="utf-8")


def _variables_in_source() -> set[str]:
    found = set()
    for path in (ROOT / "src" / "pipeopt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.update(re.findall(r"\bPIPEOPT_[A-Z0-9_]*[A-Z0-9]\b", node.value))
    return found


def test_every_environment_variable_the_package_reads_is_documented(hook: ModuleType) -> None:
    in_source = _variables_in_source()
    assert "PIPEOPT_WORKERS" in in_source
    documented = set(hook.variables(build_parser()))
    assert in_source <= documented, f"not in any option's help: {sorted(in_source - documented)}"
    table = hook.environment_reference()
    for variable in in_source:
        assert f"| `{variable}` |" in table


def test_every_extra_is_described_and_every_install_hint_names_one(hook: ModuleType) -> None:
    declared = hook.extras()
    page = (REFERENCE / "extras.md").read_text(encoding="utf-8")
    described = set(re.findall(r"<!-- extra-packages: ([a-z0-9-]+) -->", page))
    assert described == set(declared)
    hints = set()
    for path in (ROOT / "src" / "pipeopt").rglob("*.py"):
        hints.update(re.findall(r"pipeopt\[([a-z0-9-]+)\]", path.read_text(encoding="utf-8")))
    assert hints
    assert hints <= set(declared), f"install hints name no extra: {sorted(hints - set(declared))}"
    with pytest.raises(KeyError, match="no extra 'nope'"):
        hook.extra_packages("nope", declared)


def _headings(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    return {match.strip("` ") for match in re.findall(r"^#{2,4} (.+)$", text, re.MULTILINE)}


def test_every_error_class_has_a_troubleshooting_entry() -> None:
    import pipeopt.errors

    classes = {
        name
        for name, value in vars(pipeopt.errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == "pipeopt.errors"
    }
    assert {"PipeoptError", "CycleError", "RunInterrupted"} <= classes
    missing = classes - _headings(ROOT / "docs" / "troubleshooting.md")
    assert not missing, f"no heading in docs/troubleshooting.md for {sorted(missing)}"


def _documented(pages: list[str]) -> set[str]:
    found = set()
    for page in pages:
        text = (REFERENCE / page).read_text(encoding="utf-8")
        found.update(re.findall(r"^::: ([\w.]+)", text, re.MULTILINE))
    return found


@pytest.mark.parametrize(
    ("module", "page"),
    [("pipeopt", "api.md"), ("pipeopt.sinks", "sinks.md"), ("pipeopt.executors", "executors.md")],
)
def test_every_public_name_has_an_api_reference(module: str, page: str) -> None:
    import pipeopt.errors

    directives = _documented([page])
    errors_page = "pipeopt.errors" in _documented(["errors.md"])
    missing = [
        name
        for name in importlib.import_module(module).__all__
        if f"{module}.{name}" not in directives
        and not (errors_page and name in vars(pipeopt.errors))
    ]
    assert not missing, f"docs/reference/{page} has no `::: {module}.NAME` for {missing}"


def _prose() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_commands_and_flags_the_docs_mention_exist() -> None:
    commands = _subparsers(build_parser())
    options = {
        name: {option for action in sub._actions for option in action.option_strings}
        for name, sub in commands.items()
    }
    wrong = []
    for page in _prose():
        in_code = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith(("```", "~~~")):
                in_code = not in_code
                continue
            # `pipeopt CMD ...` up to the end of the command: a pipe, a comment, a code span's end.
            for match in re.finditer(r"\bpipeopt ([a-z][\w-]*)([^`|;#&/\n]*)", line):
                command, rest = match.groups()
                if command not in commands:
                    if f"`pipeopt {command}" in line or (
                        in_code and re.match(r"\s*(\$ )?(\S*/)?pipeopt ", line)
                    ):
                        wrong.append(f"{page.name}:{number}: no command {command!r}")
                    continue
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                    if flag not in options[command] and flag != "--help":
                        wrong.append(f"{page.name}:{number}: pipeopt {command} has no {flag}")
    assert not wrong, "\n".join(wrong)


def test_environment_variables_the_docs_mention_exist() -> None:
    known = _variables_in_source()
    for path in (ROOT / "tests").rglob("*.py"):
        known.update(
            re.findall(r"\bPIPEOPT_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8"))
        )
    wrong = []
    for page in _prose():
        mentioned = set(re.findall(r"\bPIPEOPT_[A-Z0-9_]*[A-Z0-9]\b", page.read_text("utf-8")))
        wrong += [f"{page.name}: {name}" for name in sorted(mentioned - known)]
    assert not wrong, f"no such variable: {wrong}"
