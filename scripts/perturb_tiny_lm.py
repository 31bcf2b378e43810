"""Run examples/train_tiny_lm.py with every parameter scaled by (1 + eps * N(0, 1)).

The control for docs/distributed.md ("Equal to one process, to rounding"): the
gap between a run and its perturbed twin, both in one process, shows how much
the training itself amplifies a rounding-sized difference, with no sharding
involved. Compare the metrics.json train_losses of the two runs:

    python3 examples/train_tiny_lm.py --out runs/a --table-optim rowwise-adam --steps 60 --eval-every 30 \
        --threads 1 --dtype float64
    python3 scripts/perturb_tiny_lm.py --eps 1e-15 --out runs/b --table-optim rowwise-adam --steps 60 \
        --eval-every 30 --threads 1 --dtype float64

Every other argument goes to train_tiny_lm.py unchanged.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import train_tiny_lm  # noqa: E402


def main(argv) -> None:
    if len(argv) < 2 or argv[0] != "--eps":
        raise SystemExit("usage: perturb_tiny_lm.py --eps EPS [train_tiny_lm.py arguments]")
    eps = float(argv[1])
    if not eps >= 0:
        raise SystemExit(f"--eps={argv[1]!r}: expected a float >= 0")
    make_optimizers = train_tiny_lm.make_optimizers

    def perturbed(model, args):
        # Called once per model, after it is built (and sharded) and before its
        # optimizers exist: the perturbed values are the initial ones.
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + eps * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        return make_optimizers(model, args)

    train_tiny_lm.make_optimizers = perturbed
    train_tiny_lm.main(argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
