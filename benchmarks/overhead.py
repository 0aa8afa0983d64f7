"""Per-step cost of caching that skips nothing, adacache and each anchor (the bench's overhead
track on its own, so it can be re-run without the quality matrix).

    python benchmarks/overhead.py [--models diffusers-dit-s diffusers-dit-b] [--steps 20] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

from adacache.bench import report, tracks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["diffusers-dit-s"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = tracks.overhead_track(args.models, steps=args.steps, repeats=args.repeats)
    print(report.overhead_table(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump([r.to_dict() for r in rows], fh, indent=2)


if __name__ == "__main__":
    main()
