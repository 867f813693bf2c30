"""``polyattn data {listops,pathfinder,coco-shapes} --out DIR ...``: generate data in the official layouts.

ListOps and Pathfinder in the layouts of the LRA release; coco-shapes, a small synthetic instance
segmentation set in the COCO 2017 layout (needs pycocotools).
"""

from __future__ import annotations

import argparse
import time

from . import at_least, fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    lo = sub.add_parser(
        "listops",
        help="ListOps TSV files (basic_train/val/test.tsv), LRA's generator specification",
        description="Generate ListOps into DIR/basic_{train,val,test}.tsv (header Source<TAB>Target).",
    )
    lo.add_argument("--train", type=int, default=96000, help="training samples (default 96000)")
    lo.add_argument("--val", type=int, default=2000, help="validation samples (default 2000)")
    lo.add_argument("--test", type=int, default=2000, help="test samples (default 2000)")
    lo.add_argument("--min-length", type=int, default=500, help="keep length > this (default 500)")
    lo.add_argument("--max-length", type=int, default=2000, help="keep length < this (default 2000)")
    lo.add_argument("--max-depth", type=int, default=10)
    lo.add_argument("--max-args", type=int, default=10)
    pf = sub.add_parser(
        "pathfinder",
        help="Pathfinder PNG images + metadata in the layout of LRA's pathfinder32",
        description="Generate Pathfinder images into DIR/<curv_...>/imgs/<b>/sample_<i>.png + metadata/<b>.npy.",
    )
    pf.add_argument("--num", type=at_least(1), default=200000, help="number of images (default 200000)")
    pf.add_argument(
        "--difficulty",
        choices=["easy", "intermediate", "hard"],
        default="hard",
        help="contour length 6 / 9 / 14 (default hard, the LRA task)",
    )
    pf.add_argument("--contour-length", type=at_least(1), help="paddles per target contour (overrides --difficulty)")
    pf.add_argument("--size", type=at_least(8), default=32, help="image side in pixels (default 32)")
    pf.add_argument("--distractors", type=at_least(0), help="distractor contours (default 20 // (contour length // 3))")
    pf.add_argument("--workers", type=at_least(0), default=0, help="processes (default 0 = all cores)")
    for q in (lo, pf):
        q.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
        q.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
        q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cs = sub.add_parser(
        "coco-shapes",
        help="synthetic squares/circles/triangles with polygon masks in the COCO 2017 layout",
        description="Generate DIR/annotations/instances_{train,val}2017.json + DIR/{train,val}2017/*.png.",
    )
    cs.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    cs.add_argument("--train", type=at_least(1), default=200, help="training images (default 200)")
    cs.add_argument("--val", type=at_least(1), default=50, help="validation images (default 50)")
    cs.add_argument("--size", type=int, metavar="PX", help="square images of this side (default: sides 64 to 128)")
    cs.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from ..utils.outdir import check_out_dir, write_marker
    from ..utils.rundir import RunDirError

    t0 = time.perf_counter()
    command = f"data {args.dataset}"
    try:
        check_out_dir(args.out, command)  # the user's own files in --out are never overwritten
        if args.dataset == "listops":
            from ..data.lra.listops import write_listops

            paths = write_listops(
                args.out,
                args.train,
                args.val,
                args.test,
                args.seed,
                args.min_length,
                args.max_length,
                args.max_depth,
                args.max_args,
                progress=not args.no_progress,
            )
            where = ", ".join(str(p) for p in paths.values())
        elif args.dataset == "pathfinder":
            from ..data.lra.pathfinder import DIFFICULTIES, PathfinderSpec, write_pathfinder

            contour = args.contour_length if args.contour_length is not None else DIFFICULTIES[args.difficulty][1]
            spec = PathfinderSpec(size=args.size, contour_length=contour, num_distractors=args.distractors)
            where = str(write_pathfinder(args.out, args.num, spec, args.seed, args.workers, not args.no_progress))
        else:
            from ..data.coco import generate_coco_shapes

            size = args.size if args.size is not None else (64, 128)
            info = generate_coco_shapes(args.out, args.train, args.val, size, args.seed)
            where = f"{info['root']} ({info['train']['num_images']} train + {info['val']['num_images']} val images)"
    except (ValueError, ImportError, RunDirError) as e:
        return fail(e)
    write_marker(args.out, command)
    print(f"wrote {where} in {time.perf_counter() - t0:.1f} s")
    return 0
