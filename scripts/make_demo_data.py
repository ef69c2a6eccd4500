"""Write the demo's offline imagefolder dataset (see memreg.demo.data.py).

    python scripts/make_demo_data.py OUT_DIR [--seed 0] [--n-dup 8] [--dup-copies 48] [--n-unique 600] [--resolution 16] [--p-pair 0.25] ...
"""

import argparse
import json
import sys
from dataclasses import fields

from memreg.demo.data import DemoDataConfig, WorldConfig, build_demo_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    knobs = [f for f in fields(DemoDataConfig) if f.name != "world"]
    for f in knobs:
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    for f in fields(WorldConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help="world: how much of a scene its caption names")
    args = p.parse_args(argv)
    world = WorldConfig(**{f.name: getattr(args, f.name) for f in fields(WorldConfig)})
    cfg = DemoDataConfig(**{f.name: getattr(args, f.name) for f in knobs}, world=world)
    try:
        manifest = build_demo_dataset(args.out_dir, cfg)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in manifest.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
