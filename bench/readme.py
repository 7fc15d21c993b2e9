"""README's (and docs') measured tables come from ``docs/tables/``, written by the benches.

    python bench/readme.py            # copy every table into README.md and docs/*.md
    python bench/readme.py --check    # exit 1 if one of them differs from docs/tables/

README marks each generated table::

    <!-- table: quickstart -->
    ...  (replaced by docs/tables/quickstart.md)
    <!-- /table -->

and ``docs/tables/<name>.md`` is what a bench script printed with ``--docs`` (the table,
the command that made it and the machine; ``bench/common.py``). Nothing between the
markers is edited by hand: ``tests/test_readme.py`` fails when a document and docs/tables
disagree.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "docs/distillation.md", "docs/quantization.md",
             "docs/compression.md", "docs/mnist.md", "docs/llm.md")
TABLES = os.path.join(ROOT, "docs", "tables")
MARKED = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str) -> str:
    """``text`` with every marked table replaced by its ``docs/tables`` file."""

    def table(match: re.Match) -> str:
        path = os.path.join(TABLES, f"{match.group(2)}.md")
        if not os.path.exists(path):
            raise FileNotFoundError(f"a document marks table {match.group(2)!r} but {path} "
                                    "is missing: run its bench script with --docs")
        with open(path) as f:
            body = f.read().rstrip("\n") + "\n"
        return match.group(1) + body + match.group(4)

    return MARKED.sub(table, text)


def documents() -> list[str]:
    """The documents that may hold marked tables (those that exist)."""
    return [p for p in (os.path.join(ROOT, d) for d in DOCUMENTS) if os.path.exists(p)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for path in documents():
        with open(path) as f:
            text = f.read()
        rendered = render(text)
        if rendered == text:
            continue
        stale.append(os.path.relpath(path, ROOT))
        if not args.check:
            with open(path, "w") as f:
                f.write(rendered)
    if args.check and stale:
        print(f"{', '.join(stale)} differ(s) from docs/tables/: run python bench/readme.py",
              file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'updated'}: {', '.join(stale) or 'nothing to do'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
