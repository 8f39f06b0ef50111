"""``qvl export FORMAT ...``: one subcommand per artifact format.

To add a format, write ``_add_<format>(formats)`` registering its subparser with a ``func``
that returns an exit code, and append it to ``FORMATS``; exporter code lives in its own module
(``qvl.export.<format>``), imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import logging


def _progress():
    # exports take minutes on real checkpoints: show their progress without -v
    logger = logging.getLogger("qvl")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


def _run_onnx(args) -> int:
    from qvl.export.onnx import export_onnx

    _progress()
    out = export_onnx(args.src, args.out, dtype=args.dtype, onnx_only=args.onnx_only, opset=args.opset,
                      tolerance=args.tolerance, copy=args.copy)
    print(out)
    return 0


def _add_onnx(formats) -> None:
    p = formats.add_parser("onnx", help="vision tower -> vision.onnx (dynamic resolution), validated",
                           description="Export the vision tower to ONNX, check it against the torch "
                                       "tower, and write an artifact loadable with --vision-backend onnx.")
    p.add_argument("src", help="checkpoint directory")
    p.add_argument("out", nargs="?", help="new artifact directory: SRC's files (hard links) + vision.onnx "
                                          "+ qvl-manifest.json")
    p.add_argument("--onnx-only", action="store_true",
                   help="write vision.onnx and the manifest entry into SRC instead of a new OUT")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float,
                   help="max |onnx - torch| / max |torch| allowed (default 1e-4 fp32, 2e-2 fp16)")
    p.add_argument("--copy", action="store_true", help="copy checkpoint files instead of hard-linking")
    p.set_defaults(func=_run_onnx)


FORMATS = [_add_onnx]


def register(sub) -> argparse.ArgumentParser:
    """Add the ``export`` command group to the top-level subparsers ``sub``."""
    p = sub.add_parser("export", help="write deployable artifacts (ONNX vision tower, ...)")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for add in FORMATS:
        add(formats)
    return p
