#!/usr/bin/env python3
"""Model loads per job for a batch, stage-major versus job-by-job, under a memory budget that
cannot hold every model at once.

    python bench/model_swaps.py [--jobs 10] [--load-delay 0.5]

The budget holds the diffusion model and the VAE but not the text encoder besides them, as a
24 GB card holds the 20 GB diffusion model and the 0.25 GB VAE but not the 9 GB text encoder
too. ``--load-delay`` adds seconds to each load to imitate a real model's load time.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from batch import model_sizes, run_batch

from stages.tiny_model import build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--load-delay", type=float, default=0.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="qie-bench-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        sizes = model_sizes(root / "sizes", model)
        budget = sizes["transformer"] + sizes["vae"] + 1024
        assert budget < sum(sizes.values()), "the budget must not hold every model"
        results = {policy: run_batch(root / policy, model, args.jobs, scheduling=policy,
                                     model_memory_budget=budget, model_load_delay=args.load_delay)
                   for policy in ("job-by-job", "stage-major")}
    print(f"\n{args.jobs} jobs; model sizes {', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in sizes.items())}; "
          f"budget {budget / 1e6:.2f} MB; load delay {args.load_delay} s\n")
    print(f"{'policy':<13}{'vae':>5}{'text_enc':>10}{'transformer':>13}{'loads/job':>11}{'load s':>9}{'wall s':>9}{'done':>6}")
    for policy, r in results.items():
        total = sum(r.loads.values())
        print(f"{policy:<13}{r.loads.get('vae', 0):>5}{r.loads.get('text_encoder', 0):>10}"
              f"{r.loads.get('transformer', 0):>13}{total / args.jobs:>11.2f}{r.load_seconds:>9.2f}"
              f"{r.seconds:>9.2f}{r.published:>6}")
    saved = results["job-by-job"].load_seconds - results["stage-major"].load_seconds
    print(f"\nload time saved by stage-major: {saved:.2f} s "
          f"({saved / max(results['job-by-job'].load_seconds, 1e-9):.0%} of job-by-job's)")


if __name__ == "__main__":
    main()
