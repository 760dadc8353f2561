"""Regenerate the committed dashboard JSON (``--check``: fail if it is out of date)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dashboards import grafana, resource

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "provisioning" / "grafana" / "dashboards" / "resource-dashboard.json"


def generated() -> dict[Path, str]:
    """Return every generated file and its content (deterministic: sorted keys, 2 spaces)."""
    board = grafana.render(resource.dashboard())
    return {OUTPUT: json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a committed file differs from what the code generates",
    )
    args = parser.parse_args(argv)
    stale = []
    for path, content in generated().items():
        if path.exists() and path.read_text(encoding="utf-8") == content:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
    for path in stale:
        verb = "out of date" if args.check else "wrote"
        print(f"{verb}: {path.relative_to(ROOT)}", file=sys.stderr if args.check else sys.stdout)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
