"""``memreg report RUN_DIR [RUN_DIR ...] --out report.html``: a static HTML summary of runs.

Reads the TensorBoard event files under each RUN_DIR (recursively) and writes one HTML page with
PNG plots in a ``<name>_files/`` folder beside it; the page is built by :mod:`memreg.report`.
Several RUN_DIRs are compared side by side (one line colour / one column per run).

Exit status: 0 on success, 2 on bad input (a RUN_DIR that is missing or has no event files, an
existing report without ``--overwrite``). ``--overwrite`` only removes files an earlier report
listed in its assets folder's marker file, so a folder memreg did not write is never touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memreg.report import MARKER, ReportError, build_report, load_run, name_runs


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="training output dir(s); event files are found recursively")
    parser.add_argument("--out", required=True, help="HTML file to write (PNGs go to <name>_files/ beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--title", default=None, help="page title (default: names the runs)")
    return parser


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    assets = out.parent / f"{out.stem}_files"
    try:
        if out.suffix.lower() not in (".html", ".htm"):
            raise ReportError(f"--out {str(out)!r}: expected an .html file")
        if out.is_dir():
            raise ReportError(f"--out {str(out)!r} is a directory")
        if not args.overwrite:
            if out.exists():
                raise ReportError(f"{str(out)!r} exists; pass --overwrite to replace it")
            if assets.exists() and any(assets.iterdir()):
                raise ReportError(f"{str(assets)!r} exists and is not empty; pass --overwrite to replace the report")
        elif assets.exists() and any(assets.iterdir()) and not (assets / MARKER).is_file():
            raise ReportError(f"{str(assets)!r} exists but was not written by memreg report; not touching it")
        runs = [load_run(d) for d in args.run_dirs]
    except ReportError as err:
        print(f"memreg report: error: {err}", file=sys.stderr)
        return 2
    name_runs(runs)
    if args.overwrite and (assets / MARKER).is_file():
        for name in (assets / MARKER).read_text().split():
            p = assets / name
            if p.parent == assets and p.is_file():
                p.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    title = args.title or "memreg report: " + ", ".join(r.name for r in runs)
    written = build_report(runs, out, title)
    print(f"wrote {out} ({len(written)} PNGs in {assets})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memreg report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
