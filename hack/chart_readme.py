"""Generates the values table of charts/kubetune/README.md from the `# --` comments in values.yaml.

Usage: python hack/chart_readme.py [--check]

A `# --` comment (and the `#` lines right after it) documents the key below it, in the style of
helm-docs. Every value must be documented, either on its own key or on a parent key. The table is
written between the BEGIN/END markers of the README; the prose around it is kept as it is. With
--check nothing is written and the exit status is 1 when the README is out of date.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART_DIR = Path(__file__).resolve().parents[1] / "charts" / "kubetune"
BEGIN = "<!-- BEGIN generated values table: hack/chart_readme.py -->"
END = "<!-- END generated values table -->"

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-]+):(?:\s|$)")
_DOC_START = re.compile(r"^ *# -- ?(?P<text>.*)$")
_DOC_MORE = re.compile(r"^ *#(?: (?P<text>.*))?$")


class ValuesDocError(Exception):
    """values.yaml has a key without documentation, or a comment that documents nothing."""


@dataclass(frozen=True)
class ValueDoc:
    path: tuple[str, ...]
    description: str


def parse_docs(text: str) -> list[ValueDoc]:
    """The documented keys of a values.yaml text, in file order."""
    docs: list[ValueDoc] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if (start := _DOC_START.match(line)) is not None:
            pending = [start["text"].strip()]
            continue
        if pending is not None and (more := _DOC_MORE.match(line)) is not None:
            pending.append((more["text"] or "").strip())
            continue
        key_line = _KEY_LINE.match(line)
        if key_line is None:
            if pending is not None and line.strip():
                raise ValuesDocError(f"values.yaml:{number}: a `# --` comment must be followed by the key it documents")
            if not line.strip():
                pending = None
            continue
        indent = len(key_line["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key_line["key"]))
        if pending is not None:
            docs.append(ValueDoc(tuple(key for _, key in stack), " ".join(part for part in pending if part)))
            pending = None
    return docs


def _leaf_paths(value: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(value, dict) and value:
        return [leaf for key, child in value.items() for leaf in _leaf_paths(child, (*path, str(key)))]
    return [path]


def _lookup(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = values
    for key in path:
        node = node[key]
    return node


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(text: str) -> str:
    """The markdown values table for a values.yaml text; raises ValuesDocError on undocumented values."""
    values = yaml.safe_load(text) or {}
    docs = parse_docs(text)
    documented = {doc.path for doc in docs}
    missing = [".".join(leaf) for leaf in _leaf_paths(values) if not any(leaf[:depth] in documented for depth in range(1, len(leaf) + 1))]
    if missing:
        raise ValuesDocError("values without a `# --` comment: " + ", ".join(missing))
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for doc in docs:
        value = _lookup(values, doc.path)
        default = json.dumps(value, separators=(",", ":"))
        rows.append(f"| `{'.'.join(doc.path)}` | {_type_name(value)} | `{_cell(default)}` | {_cell(doc.description)} |")
    return "\n".join(rows)


def render_readme(readme: str, table: str) -> str:
    """The README with the text between the markers replaced by the table."""
    before, sep, rest = readme.partition(BEGIN)
    _, sep_end, after = rest.partition(END)
    if not sep or not sep_end:
        raise ValuesDocError(f"README lacks the markers {BEGIN!r} and {END!r}")
    return f"{before}{BEGIN}\n{table}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README is out of date; write nothing")
    parser.add_argument("--chart", type=Path, default=CHART_DIR, help="chart directory")
    args = parser.parse_args(argv)
    readme_path: Path = args.chart / "README.md"
    try:
        wanted = render_readme(readme_path.read_text(), render_table((args.chart / "values.yaml").read_text()))
    except ValuesDocError as error:
        print(f"chart_readme: {error}", file=sys.stderr)
        return 1
    if readme_path.read_text() == wanted:
        return 0
    if args.check:
        print(f"chart_readme: {readme_path} is out of date; run python hack/chart_readme.py", file=sys.stderr)
        return 1
    readme_path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
