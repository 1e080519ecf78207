"""Print lines per source file, largest first; exit 1 if any file is over the budget (DESIGN.md: 800).

    python tools/linecount.py [--max=800] [--top=20]
"""

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    limit = int(next((a.split("=")[1] for a in argv if a.startswith("--max=")), 800))
    top = int(next((a.split("=")[1] for a in argv if a.startswith("--top=")), 20))
    root = Path(__file__).resolve().parent.parent
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=root, capture_output=True, text=True).stdout.split()
    counts = sorted(((len((root / f).read_text().splitlines()), f) for f in files if (root / f).is_file()),
                    reverse=True)
    for n, f in counts[:top]:
        print(f"{n:6d}  {f}")
    print(f"{sum(n for n, _ in counts):6d}  total in {len(counts)} files")
    over = [(n, f) for n, f in counts if n > limit]
    for n, f in over:
        print(f"error: {f} has {n} lines, over the {limit}-line budget: split it", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
