"""Regenerate the pretrained digits backbone shipped in tlwidgets/zoo/data/digits_backbone.pt.

Trains :class:`tlwidgets.zoo.digits.DigitsBackbone` on scikit-learn's digits 0-4
(deterministic: seed 0, one CPU thread; about a second) and writes its
``state_dict`` atomically. No download happens: the digits ship with scikit-learn.

Usage::

    python scripts/build_pretrained.py            # writes the packaged file
    python scripts/build_pretrained.py --out x.pt # somewhere else
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tlwidgets.zoo.digits import BACKBONE_FILE, save_atomic, train_backbone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BACKBONE_FILE, help="where to write the weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    backbone, accuracy = train_backbone(seed=args.seed)
    seconds = time.perf_counter() - t0
    save_atomic(backbone.state_dict(), args.out)
    # Prove the file loads the safe way before declaring success.
    torch.load(args.out, map_location="cpu", weights_only=True)
    size_kb = args.out.stat().st_size / 1024
    params = sum(p.numel() for p in backbone.parameters())
    print(
        f"wrote {args.out} ({size_kb:.1f} KiB, {params} parameters); "
        f"trained in {seconds:.2f} s, pretraining accuracy {accuracy:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
