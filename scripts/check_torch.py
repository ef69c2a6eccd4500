"""Fail loudly if installing memreg replaced the requested torch build (e.g. by a CUDA one).

Usage: python scripts/check_torch.py "torch==2.13.0"
"""

import importlib.util
import sys

spec = sys.argv[1] if len(sys.argv) > 1 else "torch==2.13.0"
import torch  # noqa: E402

installed = torch.__version__
problems = []
if "==" in spec:
    wanted = spec.split("==", 1)[1].strip()
    if installed.split("+")[0] != wanted.split("+")[0]:
        problems.append(f"torch {installed} is installed but {spec} was requested: something upgraded it")
for banned in ("torchvision", "timm", "open_clip"):
    if importlib.util.find_spec(banned) is not None:
        problems.append(f"{banned} is installed; memreg must not pull it in (it drags in a CUDA torch build)")
if problems:
    sys.exit("check_torch: " + "; ".join(problems))
print(f"check_torch: torch {installed} (cuda={torch.version.cuda}) as requested by {spec!r}")
