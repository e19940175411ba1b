"""The steering options of `steermoe serve` (and `steermoe run-batch`), each defined once.

`SteeringOptions` has one field per option, as vLLM's `FrontendArgs` does: the field's name is
the option (`client_profiles` -> `--client-profiles`) and the argparse `dest`, its type says
how the value is read (`bool`: a switch; `int`: a number; `list[str]`: repeatable), its default
is the option's, and its metadata holds the help text and the metavar. Both the argparse
options (`add_steering_options`) and README's options table (`markdown_table`) are made from
these fields; nothing else describes an option. Checking the values is `server.config`'s job
(`steering_config` in `server.serve_command` builds the `ServerConfig` the server runs with).

    python -m server.serve_options --markdown          print README's options table
    python -m server.serve_options --write README.md   replace the table between the markers

`tests/server/test_serve_options.py` fails when README's table differs from `markdown_table()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expert_profiles.request_steering import PROFILE_DIR_ENV
from server.config import (
    ADMIN_TOKEN_ENV,
    DEFAULT_MAX_REQUEST_BYTES,
    LOWERS_SAFETY_TAG,
    NO_PROFILES,
)

README_START = ("<!-- serve-options:start: made from server/serve_options.py by "
                "`python -m server.serve_options --write README.md` -->")
README_END = "<!-- serve-options:end -->"


def option(default: Any = None, *, help: str, metavar: str | None = None) -> Any:
    """A `SteeringOptions` field: `help` is the option's one description (argparse and README),
    `metavar` names its value in both."""
    return dataclasses.field(default=default, metadata={"help": help, "metavar": metavar})


@dataclasses.dataclass(frozen=True)
class SteeringOptions:
    """The steering options, as given on the command line (checked by `server.config`)."""

    profiles: str | None = option(
        metavar="DIR",
        help=f"directory of `NAME.json` profiles (`steermoe-profile/1`); default "
        f"`${PROFILE_DIR_ENV}`",
    )
    endpoint: list[str] | None = option(
        metavar="NAME=PROFILE", help="serve `NAME` as a model that always runs `PROFILE` "
        "(several composed: `NAME=A+B`; `NAME=guard:GUARD`: the guard's profile where the "
        "guard fires)",
    )
    endpoint_client_profiles: list[str] | None = option(
        metavar="NAME=A,B", help="profiles a client may add to what endpoint `NAME` runs "
        "(`steering_profile` on a request to it); default: none",
    )
    client_profiles: str | None = option(
        metavar="A,B",
        help=f"profiles clients may select; `{NO_PROFILES}` for none. Default: every profile "
        f"not tagged `{LOWERS_SAFETY_TAG}` (such profiles must be named here explicitly)",
    )
    allow_inline_steering: bool = option(
        False, help="let requests give expert sets inline (`steering`)",
    )
    allow_routing_capture: bool = option(
        False, help="let requests ask for their routing (`capture_routing`)",
    )
    admin_token_file: str | None = option(
        metavar="FILE",
        help=f"enables the profile admin API with the token in FILE (or env `{ADMIN_TOKEN_ENV}`;"
        " neither: the admin API is disabled); a token on the command line (`--admin-token`) "
        "is refused, since the process list shows it",
    )
    max_request_bytes: int = option(
        DEFAULT_MAX_REQUEST_BYTES, metavar="N",
        help="largest request body in bytes; 413 beyond",
    )
    audit_log: str | None = option(
        metavar="FILE",
        help="also append the audit lines of steered requests to FILE (they always go to stderr)",
    )


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option as argparse and README see it, read off a `SteeringOptions` field."""

    dest: str
    kind: type  # bool, int, str
    repeatable: bool
    default: Any
    help: str
    metavar: str | None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def usage(self) -> str:
        """`--flag METAVAR` (a switch takes no value)."""
        return self.flag if self.kind is bool else f"{self.flag} {self.metavar}"

    @property
    def description(self) -> str:
        """The help text with what the field itself says: repeatable, non-trivial default."""
        text = self.help
        if self.repeatable:
            text += " (repeatable)"
        if self.default not in (None, False):
            text += f" (default: {self.default})"
        return text

    def argparse_kwargs(self) -> dict[str, Any]:
        help_text = self.description.replace("%", "%%")
        if self.kind is bool:
            return {"action": "store_true", "help": help_text}
        kwargs: dict[str, Any] = {"metavar": self.metavar, "help": help_text,
                                  "default": self.default}
        if self.repeatable:
            kwargs["action"] = "append"
        if self.kind is not str:
            kwargs["type"] = self.kind
        return kwargs


def _value_type(hint: Any) -> tuple[type, bool]:
    """(type of one value, repeatable) of a field annotation: `T`, `T | None`, `list[T] | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def option_specs(options: type = SteeringOptions) -> list[OptionSpec]:
    """The options of the dataclass `options`, in field order."""
    hints = typing.get_type_hints(options)
    specs = []
    for item in dataclasses.fields(options):
        kind, repeatable = _value_type(hints[item.name])
        specs.append(OptionSpec(dest=item.name, kind=kind, repeatable=repeatable,
                                default=item.default, help=item.metadata["help"],
                                metavar=item.metadata["metavar"]))
    return specs


def add_steering_options(group: Any) -> None:
    """Add every steering option to an argparse parser or argument group."""
    for spec in option_specs():
        group.add_argument(spec.flag, dest=spec.dest, **spec.argparse_kwargs())


def markdown_table() -> str:
    """README's options table (without the markers)."""
    rows = ["| option | meaning |", "|---|---|"]
    rows += [f"| `{spec.usage}` | {_cell(spec.description)} |" for spec in option_specs()]
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table_span(text: str) -> tuple[int, int]:
    """Where the table between the markers begins and ends in `text` (README)."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {README_START!r} ... {README_END!r} markers")
    return start + len(README_START) + 1, end


def table_in(text: str) -> str:
    """The table between the markers in `text` (README)."""
    start, end = _table_span(text)
    return text[start:end]


def replace_table(text: str) -> str:
    """`text` (README) with the table between the markers replaced by `markdown_table()`."""
    start, end = _table_span(text)
    return text[:start] + markdown_table() + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.serve_options",
                                     description="README's table of the steering options.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print the table")
    what.add_argument("--write", metavar="README", type=Path,
                      help="replace the table between the markers in README")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    text = args.write.read_text(encoding="utf-8")
    args.write.write_text(replace_table(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
