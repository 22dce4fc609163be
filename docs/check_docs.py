"""Check the documentation's size limits: the README's bytes and every Markdown table cell.

The README is for users and stays under 16,000 bytes; no table cell in the README or docs/ is
longer than 400 characters, so a table never turns into a lab notebook again (history belongs
in docs/experiments/).

    python docs/check_docs.py            # prints the largest cell of each file; exit 1 if a limit is crossed
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 16_000  # bytes
CELL_LIMIT = 400  # characters


def table_cells(text: str) -> list[tuple[int, str]]:
    """(line number, cell) of every cell of every Markdown table row outside code fences."""
    cells, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not line.lstrip().startswith("|"):
            continue
        # Split on pipes that are not escaped (\|) and not inside `code`.
        parts = re.split(r"(?<!\\)\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line.strip().strip("|"))
        cells += [(number, part.strip()) for part in parts]
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    failed = False
    readme_bytes = len((ROOT / "README.md").read_bytes())
    print(f"README.md: {readme_bytes:,} bytes (limit {README_LIMIT:,})")
    failed |= readme_bytes > README_LIMIT
    for path in files:
        cells = table_cells(path.read_text(encoding="utf-8"))
        if not cells:
            continue
        number, longest = max(cells, key=lambda c: len(c[1]))
        print(f"{path.relative_to(ROOT)}: largest table cell {len(longest)} characters (line {number})")
        for number, cell in cells:
            if len(cell) > CELL_LIMIT:
                print(f"  line {number}: a cell of {len(cell)} characters (limit {CELL_LIMIT})")
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
