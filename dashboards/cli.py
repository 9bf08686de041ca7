"""Generate gpufleet's Grafana dashboards from dashboards/*.py into dashboards/json/.

    gpufleet dashboards build            # (re)write dashboards/json/*.json
    gpufleet dashboards build --check    # exit 1 if a committed file differs from a fresh build
    gpufleet dashboards list             # uid, title and file of every dashboard

The output is deterministic (sorted keys, ids in declaration order), so the committed
JSON is byte-for-byte what a build produces; tests/test_dashboards.py runs the check.
Files in the output directory that no dashboard produces are reported by --check and
removed by build.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "build and check the Grafana dashboards (dashboards/json/)"
OUT_DIR = Path(__file__).resolve().parent / "json"


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard (file name: the uid without 'gpufleet-')."""
    from dashboards import MODULES  # grafanalib loads only when a command needs it (fast `gpufleet --help`)
    from dashboards.helpers import render

    out: dict[str, str] = {}
    for module in MODULES:
        dash = module.build()
        name = dash.uid.removeprefix("gpufleet-") + ".json"
        if name in out:
            raise ValueError(f"two dashboards would write {name}")
        out[name] = render(dash)
    return out


def stale(out_dir: Path = OUT_DIR) -> list[str]:
    """Problems with the committed JSON: missing, different or unexpected files."""
    fresh = rendered()
    problems = []
    for name, text in sorted(fresh.items()):
        path = out_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_text() != text:
            problems.append(f"{path}: differs from a fresh build")
    for path in sorted(out_dir.glob("*.json")) if out_dir.is_dir() else []:
        if path.name not in fresh:
            problems.append(f"{path}: no dashboard produces it")
    return problems


def build(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh = rendered()
    written = []
    for name, text in sorted(fresh.items()):
        path = out_dir / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    for path in sorted(out_dir.glob("*.json")):
        if path.name not in fresh:
            path.unlink()
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    b = sub.add_parser("build", help="write dashboards/json/*.json from dashboards/*.py",
                       description="Write dashboards/json/*.json from dashboards/*.py (only files that changed).")
    b.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and name the files if the committed JSON is stale")
    b.add_argument("--out", type=Path, default=OUT_DIR, metavar="DIR",
                   help=f"output directory (default: {OUT_DIR})")
    sub.add_parser("list", help="print uid, title and file of every dashboard",
                   description="Print uid, title and file of every dashboard.")


def run(args: argparse.Namespace) -> int:
    if args.command == "list":
        from dashboards import MODULES

        for module in MODULES:
            dash = module.build()
            print(f"{dash.uid}\t{dash.title}\t{dash.uid.removeprefix('gpufleet-')}.json")
        return 0
    if args.check:
        problems = stale(args.out)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run `gpufleet dashboards build` and commit dashboards/json/", file=sys.stderr)
            return 1
        print(f"dashboards up to date in {args.out}")
        return 0
    written = build(args.out)
    for path in written:
        print(f"wrote {path}")
    print(f"dashboards built in {args.out} ({len(written)} changed)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpufleet dashboards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
