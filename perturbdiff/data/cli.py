"""``perturbdiff atlas``: build, inspect, validate atlases; shared gene vocabularies; synthetic data.

    perturbdiff atlas build screen.h5ad -o screen.zarr --perturbation-key condition \\
        --control-label ctrl --context-key cell_type --batch-key donor
    perturbdiff atlas build screen2.h5ad -o screen.zarr --append --control-label ctrl   # grow it
    perturbdiff atlas info screen.zarr
    perturbdiff atlas validate screen.zarr
    perturbdiff atlas genes a.zarr b.zarr -o genes.txt
    perturbdiff atlas synthetic synthetic.zarr --num-cells 100000
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``atlas`` command and its subcommands to the ``perturbdiff`` parser."""
    atlas = subparsers.add_parser("atlas", help="build and inspect Zarr cell atlases", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = atlas.add_subparsers(dest="atlas_command", required=True)

    b = sub.add_parser("build", help="build an atlas from .h5ad files, folders of them, or Tahoe-layout parquet")
    b.add_argument("inputs", nargs="+", help=".h5ad / .parquet files or folders of them; hf://DATASET (a Hub id or local parquet folder, streamed through Hugging Face datasets); soma://URI (a TileDB-SOMA experiment, with --obs-filter)")
    b.add_argument("-o", "--output", required=True, help="the atlas to write (*.zarr): a path, or s3://, gs://, az:// (written in place; credentials from the environment)")
    g = b.add_argument_group("column mapping (obs columns of the inputs)")
    g.add_argument("--perturbation-key", default="perturbation", help="perturbation column (default: %(default)s)")
    g.add_argument("--no-perturbation", action="store_true", help="unperturbed atlas: every cell is a control")
    g.add_argument("--control-label", default="control", help="perturbation label of controls (default: %(default)s)")
    g.add_argument("--context-key", help="context column (cell type / cell line); default: all 'NA'")
    g.add_argument("--batch-key", help="batch column (donor, plate, ...); default: all 'NA'")
    g.add_argument("--dose-key", help="numeric dose column; default: 0")
    g.add_argument("--dataset-key", help="column naming the dataset")
    g.add_argument("--dataset-name", help="dataset name for all cells (default: each file's stem)")
    g = b.add_argument_group("counts and genes")
    g.add_argument("--layer", help="read counts from layers[LAYER], or 'raw' for raw.X (default: X)")
    g.add_argument("--gene-key", help="var column with gene names (default: var index)")
    g.add_argument("--input-log1p", action="store_true", help="X holds log1p-normalised values: recover counts")
    g.add_argument("--n-top-genes", type=int, default=2000, help="highly variable genes to flag (default: %(default)s)")
    g = b.add_argument_group("parquet (Hugging Face datasets, Tahoe-100M layout)")
    g.add_argument("--genes-column", default="genes")
    g.add_argument("--expressions-column", default="expressions")
    g.add_argument("--gene-metadata", help="table mapping gene ids to names (parquet/csv/tsv)")
    g.add_argument("--gene-id-column", default="token_id")
    g.add_argument("--gene-name-column", default="gene_symbol")
    g.add_argument("--obs-names-key", help="column with unique cell ids")
    g = b.add_argument_group("TileDB-SOMA / CELLxGENE Census (inputs soma://URI)")
    g.add_argument("--obs-filter", help="SOMA obs value filter, e.g. \"is_primary_data == True and tissue_general == 'blood'\"")
    g.add_argument("--soma-measurement", default="RNA", help="the measurement (default: RNA); --layer names its X layer")
    g = b.add_argument_group("storage")
    g.add_argument("--block-cells", type=int, default=16384, help="cells per streamed block (bounds memory)")
    g.add_argument("--workers", type=int, default=None,
                   help="processes reading and cleaning blocks while one writes (default: the cores, at most 8; "
                        "1: one process); the atlas is the same whatever the number")
    g.add_argument("--chunk-elems", type=int, default=32768, help="values per compressed chunk of X")
    g.add_argument("--shard-chunks", type=int, default=128, help="chunks per shard file")
    g.add_argument("--codec", choices=["zstd", "lz4"], default="zstd",
                   help="compressor of X: zstd (compact, default) or lz4 (faster to decode, ~1.8x larger)")
    g.add_argument("--seed", type=int, default=0, help="seed of the within-group shuffle")
    b.add_argument("--overwrite", action="store_true", help="replace an existing atlas")
    b.add_argument("--append", action="store_true",
                   help="add the inputs to the existing local atlas at -o as new datasets, without rewriting its X "
                        "(atomic: the atlas is swapped only once complete); genes must be the atlas's")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    i = sub.add_parser("info", help="summarise an atlas")
    i.add_argument("atlas")
    i.add_argument("--json", action="store_true", help="print the metadata and group index as JSON")
    i.set_defaults(func=_info)

    v = sub.add_parser("validate", help="read every chunk of an atlas and check its structure")
    v.add_argument("atlas")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_validate)

    gv = sub.add_parser("genes", help="write the shared gene vocabulary of atlases (union of their HVGs)")
    gv.add_argument("atlases", nargs="+")
    gv.add_argument("--genes", help="a user gene list file (one per line) instead of the HVG union")
    gv.add_argument("--n-top-genes", type=int, help="re-select each atlas's top genes instead of its stored flags")
    gv.add_argument("-o", "--output", help="file to write (default: stdout)")
    gv.set_defaults(func=_genes)

    s = sub.add_parser("synthetic", help="generate a synthetic perturbation atlas")
    s.add_argument("output")
    s.add_argument("--num-cells", type=int, default=4000)
    s.add_argument("--num-genes", type=int, default=200)
    s.add_argument("--num-contexts", type=int, default=3)
    s.add_argument("--num-perturbations", type=int, default=6)
    s.add_argument("--num-batches", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_synthetic)
    return atlas


def _build(args) -> int:
    from .builder import build_atlas

    path = build_atlas(
        args.inputs,
        args.output,
        perturbation_key=None if args.no_perturbation else args.perturbation_key,
        control_label=args.control_label,
        context_key=args.context_key,
        batch_key=args.batch_key,
        dose_key=args.dose_key,
        dataset_key=args.dataset_key,
        dataset_name=args.dataset_name,
        layer=args.layer,
        gene_key=args.gene_key,
        input_log1p=args.input_log1p,
        genes_column=args.genes_column,
        expressions_column=args.expressions_column,
        gene_metadata=args.gene_metadata,
        gene_id_column=args.gene_id_column,
        gene_name_column=args.gene_name_column,
        obs_names_key=args.obs_names_key,
        obs_filter=args.obs_filter,
        soma_measurement=args.soma_measurement,
        n_top_genes=args.n_top_genes,
        block_cells=args.block_cells,
        workers=args.workers,
        chunk_elems=args.chunk_elems,
        shard_chunks=args.shard_chunks,
        codec=args.codec,
        seed=args.seed,
        overwrite=args.overwrite,
        append=args.append,
        progress=not args.quiet,
    )
    print(_summary(path))
    return 0


def _summary(path) -> str:
    from .store import Atlas

    a = Atlas(path)
    g = a.groups
    lines = [
        f"{a.path}: {a.num_cells:,} cells x {a.num_genes:,} genes, {len(g):,} groups "
        f"({int(g['is_control'].sum()):,} control), {int(a.var['highly_variable'].sum()):,} highly variable genes",
        f"  datasets: {', '.join(sorted(g['dataset'].unique()))}",
        f"  contexts: {g['context'].nunique()}, perturbations: {g['perturbation'].nunique()} "
        f"(control label {a.control_label!r}), batches: {g['batch'].nunique()}",
    ]
    return "\n".join(lines)


def _info(args) -> int:
    from .store import Atlas

    if args.json:
        a = Atlas(args.atlas)
        groups = a.groups.assign(n_cells=a.groups["stop"] - a.groups["start"])
        json.dump({"metadata": a.metadata, "groups": groups.to_dict(orient="records")}, sys.stdout, indent=2, default=str)
        print()
    else:
        print(_summary(args.atlas))
    return 0


def _validate(args) -> int:
    from .store import Atlas

    a = Atlas(args.atlas)
    a.validate(progress=not args.quiet)
    print(f"{a.path}: ok ({a.num_cells:,} cells, every chunk read and checksummed)")
    return 0


def _genes(args) -> int:
    from .vocab import gene_vocabulary

    genes = gene_vocabulary(args.atlases, genes=args.genes, n_top_genes=args.n_top_genes)
    text = "\n".join(genes) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {len(genes)} genes to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _synthetic(args) -> int:
    from .synthetic import make_synthetic_atlas

    path = make_synthetic_atlas(
        args.output,
        num_cells=args.num_cells,
        num_genes=args.num_genes,
        num_contexts=args.num_contexts,
        num_perturbations=args.num_perturbations,
        num_batches=args.num_batches,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=True,
    )
    print(_summary(path))
    return 0
