"""Generated blocks in Markdown documents: the text between `<!-- NAME:begin -->` and
`<!-- NAME:end -->`, written by a generator from the code or from recorded results, so a
document cannot drift from what it describes (a test compares each block with its generator)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_block(text: str, name: str, body: str) -> str:
    """text with the block `name` replaced by body (which ends with a newline)."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"need exactly one {begin} ... {end} pair")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def block(text: str, name: str) -> str:
    """The body of block `name` in text."""
    begin, end = markers(name)
    return text.split(begin, 1)[1].split(end, 1)[0].removeprefix("\n")


def write_block(path: Path, name: str, body: str) -> bool:
    """Replace the block in the file; whether it changed."""
    text = path.read_text()
    new = replace_block(text, name, body)
    if new != text:
        path.write_text(new)
    return new != text


def is_fresh(path: Path, name: str, body: str) -> bool:
    text = path.read_text()
    return replace_block(text, name, body) == text


def cli(argv: list[str] | None, *, prog: str, description: str, path: Path, name: str,
        body: Callable[[], str]) -> int:
    """A generator's command line: print the block, `--write` it into path, or `--check` that
    path holds it (exit 1 when stale)."""
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"update {path.name} in place")
    mode.add_argument("--check", action="store_true", help=f"fail when {path.name}'s block is stale")
    args = ap.parse_args(argv)
    text = body()
    if args.check:
        if not is_fresh(path, name, text):
            print(f"{path.name}: the {name} block is stale: run `{prog} --write`", file=sys.stderr)
            return 1
        return 0
    if args.write:
        write_block(path, name, text)
        return 0
    sys.stdout.write(text)
    return 0
