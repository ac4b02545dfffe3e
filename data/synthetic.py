"""Recipe: a synthetic perturbation atlas (the quick start's and the tests' default data).

Negative-binomial counts over several contexts, perturbations and batches, with batch effects and
hidden per-replicate variation of the response; see `perturbdiff.data.synthetic` for the model.

    python data/synthetic.py synthetic.zarr                          # 4,000 cells x 200 genes, seconds
    python data/synthetic.py big.zarr --num-cells 1000000 --num-genes 2000 --num-contexts 8 \\
        --num-perturbations 30 --num-batches 4                        # streamed, a few minutes
    python data/synthetic.py screen.h5ad --h5ad --num-cells 100000   # the raw .h5ad instead
    python data/synthetic.py --default                               # build the cached default atlas
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", nargs="?", help="atlas (or, with --h5ad, .h5ad file) to write")
    p.add_argument("--default", action="store_true", help="build the built-in default atlas in the cache and print its path")
    p.add_argument("--h5ad", action="store_true", help="write the raw .h5ad (streamed, tiled) instead of an atlas")
    p.add_argument("--num-cells", type=int, default=4000)
    p.add_argument("--num-genes", type=int, default=200)
    p.add_argument("--num-contexts", type=int, default=3)
    p.add_argument("--num-perturbations", type=int, default=6)
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--response-spread", type=float, default=0.5, help="hidden per-replicate variation of the response")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from perturbdiff.data import synthetic

    if args.default:
        print(synthetic.ensure_default_atlas())
        return 0
    if not args.output:
        p.error("give an output path (or --default)")
    shape = dict(
        num_cells=args.num_cells,
        num_genes=args.num_genes,
        num_contexts=args.num_contexts,
        num_perturbations=args.num_perturbations,
        num_batches=args.num_batches,
        response_spread=args.response_spread,
        seed=args.seed,
    )
    if args.h5ad:
        print(synthetic.write_synthetic_h5ad(args.output, **shape))
    else:
        print(synthetic.make_synthetic_atlas(args.output, overwrite=args.overwrite, progress=True, **shape))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
