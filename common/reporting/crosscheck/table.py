"""results/crosscheck.md: one markdown table, a row per compared file, rewritten in place.

A run replaces the rows of the files it compared (matched by the `file` cell) and keeps every other row, so the
comparisons can be rerun one algorithm at a time; the text above the table names the last command, its date and
this repository's commit, and each row its own.
"""

from __future__ import annotations

import re
from pathlib import Path

COLUMNS = ("file", "reference (repository, file, commit)", "losses: max abs diff", "parameters: max abs diff",
           "dtype", "notes", "run (command, date, commit)")
TITLE = "# One update against the reference implementations"
ABOUT = """Each row puts one of this library's files and a reference implementation on the same weights, the same batch
and the same random draws, takes one update on each, and reports the largest absolute difference of the losses
and of every parameter after it (networks, targets, temperatures): float64 unless the row says otherwise, so
that what remains is the algorithm, not float32 rounding. Where the two differ on purpose, the notes say how, and
how far apart they are once the reference's choice is put in. References run from their own checkout or
package, never copied here. Written by `python -m common.reporting.crosscheck` (see its `--help`); rerunning an
algorithm replaces its row."""

_UNESCAPED_BAR = re.compile(r"(?<!\\)\|")


def split_row(line: str) -> list[str]:
    """The cells of a markdown table row, `\\|` read back as a bar inside its cell."""
    return [cell.strip().replace("\\|", "|") for cell in _UNESCAPED_BAR.split(line.strip())[1:-1]]


def join_row(cells: list[str]) -> str:
    """A markdown table row; a bar inside a cell written `\\|`."""
    return "| " + " | ".join(cell.replace("\n", " ").replace("|", "\\|") for cell in cells) + " |"


def read_rows(path: Path) -> list[list[str]]:
    """The rows of the table in `path` (none if the file or the table does not exist yet)."""
    if not path.is_file():
        return []
    rows, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("| file |"):
            inside = True
        elif inside and line.startswith("|"):
            if not set(line) <= set("|- :"):  # the separator line
                rows.append(split_row(line))
        elif inside:
            break
    return rows


def update_table(path: Path, new_rows: list[list[str]], command: str, date: str, commit: str,
                 order: list[str] = ()) -> str:
    """Write `path` with `new_rows` in place of the rows of the same file and the other rows kept; rows sorted by
    their file's position in `order` (files not in it last, in the order they came). Returns the text."""
    replaced = {row[0] for row in new_rows}
    rows = [row for row in read_rows(path) if row[0] not in replaced] + list(new_rows)
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted(rows, key=lambda row: rank.get(row[0], len(rank)))  # stable: unknown files keep their order
    text = "\n".join([TITLE, "", ABOUT, "", f"Last run: `{command}` on {date}, this repository at {commit}.", "",
                      join_row(list(COLUMNS)), "|" + "---|" * len(COLUMNS), *map(join_row, rows), ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text
