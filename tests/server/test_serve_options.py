"""`server.serve_options`: every steering option defined once, the CLI and README made from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.config import DEFAULT_MAX_REQUEST_BYTES
from server.serve_command import build_parser
from server.serve_options import (
    README_END,
    README_START,
    SteeringOptions,
    main,
    markdown_table,
    option_specs,
    replace_table,
    table_in,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_options_table_is_the_generated_one():
    assert table_in(README.read_text(encoding="utf-8")) == markdown_table(), (
        "README's steering options table differs from server/serve_options.py: run "
        "`python -m server.serve_options --write README.md`")


def test_every_field_is_an_option_of_steermoe_serve():
    parser = build_parser()
    actions = {action.dest: action for action in parser._actions}
    for spec in option_specs():
        action = actions[spec.dest]
        assert action.option_strings == [spec.flag]
        assert action.default == spec.default and action.help
        assert spec.usage in markdown_table()
    defaults = parser.parse_known_args([])[0]
    assert {field.name: getattr(defaults, field.name)
            for field in dataclasses.fields(SteeringOptions)} == \
        dataclasses.asdict(SteeringOptions())


def test_types_become_argparse_behaviour():
    args, rest = build_parser().parse_known_args([
        "--endpoint", "a=x", "--endpoint", "b=y", "--allow-inline-steering",
        "--max-request-bytes", "10", "--dtype", "float32",
    ])
    assert args.endpoint == ["a=x", "b=y"] and args.allow_inline_steering
    assert not args.allow_routing_capture and args.max_request_bytes == 10
    assert rest == ["--dtype", "float32"]
    assert build_parser().parse_args([]).max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-request-bytes", "many"])


def test_table_rows():
    rows = {spec.dest: row for spec, row in
            zip(option_specs(), markdown_table().splitlines()[2:], strict=True)}
    assert rows["endpoint"].startswith("| `--endpoint NAME=PROFILE` |")
    assert rows["endpoint"].endswith("(repeatable) |")
    assert rows["allow_routing_capture"].startswith("| `--allow-routing-capture` |")
    assert f"(default: {DEFAULT_MAX_REQUEST_BYTES})" in rows["max_request_bytes"]


def test_write_replaces_only_the_table(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{README_START}\n| old |\n{README_END}\nafter\n")
    assert main(["--write", str(readme)]) == 0
    text = readme.read_text()
    assert text == f"before\n{README_START}\n{markdown_table()}{README_END}\nafter\n"
    assert replace_table(text) == text
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table()
    with pytest.raises(ValueError, match="markers"):
        table_in("no markers here")
