"""Write the demo's offline imagefolder dataset (see memreg.demo.data.py).

    python scripts/make_demo_data.py OUT_DIR [--seed 0] [--n-dup 16] [--dup-copies 24] [--n-unique 600] [--resolution 32]
"""

import argparse
import json
import sys
from dataclasses import fields

from memreg.demo.data import DemoDataConfig, build_demo_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    for f in fields(DemoDataConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cfg = DemoDataConfig(**{f.name: getattr(args, f.name) for f in fields(DemoDataConfig)})
    try:
        manifest = build_demo_dataset(args.out_dir, cfg)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in manifest.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
