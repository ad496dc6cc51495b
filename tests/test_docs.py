"""The docs against the commands: every `tba-fed` command line in README.md and docs/ parses with the CLI as it
is (an option renamed or removed fails here, not in an operator's hands), every file of the repository they name
exists, and every `make` target they name is in the Makefile."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from tba_fed.cli import build_parser

parser = cache(build_parser)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path in this repository, not one inside another project's (flwr/server/...) or a URL
REPO_PATH = re.compile(r"(?<![\w/.-])(?:configs|scripts|benchmarks|tests|tba_fed|studies|clients|server)/[\w./*-]*[\w*]")


def command_lines(text: str) -> Iterator[str]:
    """The `tba-fed ...` lines of the fenced code blocks in `text`, continuation lines joined, `$ ` prompts cut."""
    inside, pending = False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        line = line.removeprefix("$ ")
        if line.startswith("tba-fed "):
            yield line


def parse_error(line: str) -> str | None:
    """argparse's complaint about `line` (shell-split, comments and a trailing ``&`` cut), or None if the CLI
    accepts it."""
    argv = shlex.split(line, comments=True)[1:]
    argv = argv[:-1] if argv[-1:] == ["&"] else argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            parser().parse_args(argv)
    except SystemExit as stop:
        return err.getvalue().strip().splitlines()[-1] if stop.code else None  # --help exits 0
    return None


def test_every_command_line_in_the_docs_parses():
    found = [(doc.name, line) for doc in DOCS for line in command_lines(doc.read_text())]
    assert len(found) > 40  # the docs' commands are found at all
    failures = [f"{name}: {line}: {error}" for name, line in found if (error := parse_error(line))]
    assert failures == [], "\n".join(failures)


def test_a_renamed_option_would_be_caught():
    assert parse_error("tba-fed compress --plan 2->4 --no-such-option 1").startswith(
        "tba-fed: error: unrecognized arguments: --no-such-option 1")
    assert parse_error("tba-fed compress --plan 2->4 --map folded   # a comment") is None
    assert parse_error("tba-fed superlink run.yaml &   # log: superlink.log") is None
    block = "```bash\n$ tba-fed status \\\n    run.yaml\n```\ntba-fed outside\n"
    assert list(command_lines(block)) == ["tba-fed status run.yaml"]


def test_every_repository_file_the_docs_name_exists():
    named = {(doc.name, path) for doc in DOCS for path in REPO_PATH.findall(doc.read_text())}
    assert len(named) > 40
    missing = sorted(f"{name}: {path}" for name, path in named if not list(ROOT.glob(path)))
    assert missing == [], missing


def test_every_make_target_the_docs_name_is_in_the_makefile():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {target for doc in DOCS for target in re.findall(r"`make ([\w-]+)", doc.read_text())}
    assert {"demo", "test", "test-fast"} <= named and named - targets == set()
