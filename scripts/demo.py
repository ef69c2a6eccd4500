"""The demo: memorization appears, is detected, and the guard prevents it (see memreg/demo/run.py).

    python scripts/demo.py [--config configs/demo.yaml] [--out demo_out] [--quick] [--worlds studio web]
                           [--study penalty_curve|term]
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memreg.demo.run import WORLDS, run_demo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    p.add_argument("--out", default="demo_out", help="results dir (an existing one is moved aside, never overwritten)")
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke run whose numbers mean nothing")
    p.add_argument("--worlds", nargs="+", choices=WORLDS, help="run only these worlds (default: every world "
                   "the config has; the wall-time target then counts only them)")
    p.add_argument("--study", help="a study of the config's studies: instead of the demo's runs, every guarded run "
                   "again at each value of one guard key (penalty_curve: guard.weight; term: guard.term), beside "
                   "the plain runs")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    run_demo(args.config, args.out, quick=args.quick, worlds=args.worlds, study=args.study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
