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
                      tolerance=args.tolerance, copy=args.copy, vision_quant=args.vision_quant)
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
    p.add_argument("--vision-quant", default="none", choices=["none", "int8"],
                   help="int8: the linears' weights in 8 bits per output channel (about half the file)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float,
                   help="max |onnx - torch| / max |torch| allowed (default 1e-4 fp32, 2e-2 fp16, 1e-1 int8)")
    p.add_argument("--copy", action="store_true", help="copy checkpoint files instead of hard-linking")
    p.set_defaults(func=_run_onnx)


def _run_quantized(args) -> int:
    from qvl.export.quantize import export_quantized
    from qvl.export.layerwise import QuantSpec

    _progress()
    if args.format == "awq":
        spec = QuantSpec("rtn" if args.rtn else "awq", "awq", 4, args.group_size, sym=False)
    else:
        spec = QuantSpec("rtn" if args.rtn else "gptq", "gptq", args.bits, args.group_size, sym=args.sym,
                         desc_act=args.desc_act, damp_percent=args.damp,
                         true_sequential=not args.no_true_sequential)
    out = export_quantized(args.src, args.out, spec, calib=args.calib, calib_samples=args.calib_samples,
                           max_tokens=args.max_tokens, quality_samples=args.quality_samples, device=args.device,
                           overwrite=args.overwrite)
    if args.onnx_vision:
        from qvl.export.onnx import export_onnx

        export_onnx(out, onnx_only=True)
    print(out)
    return 0


def _quant_common(p) -> None:
    p.add_argument("src", help="float checkpoint directory (Hugging Face layout, safetensors)")
    p.add_argument("out", help="new artifact directory")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale (-1: whole rows)")
    p.add_argument("--calib", help="calibration set: a directory of images (+ .txt prompts) or a qvl eval "
                                   ".jsonl (default: built-in synthetic image/video/text chats)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration chats to use")
    p.add_argument("--max-tokens", type=int, default=2048, help="skip calibration chats longer than this")
    p.add_argument("--quality-samples", type=int, default=16,
                   help="held-out chats for the manifest's KL / top-1 report (0: skip)")
    p.add_argument("--rtn", action="store_true", help="round-to-nearest baseline instead of the search")
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:1)")
    p.add_argument("--onnx-vision", action="store_true", help="also export vision.onnx into the artifact")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier qvl export")
    p.set_defaults(func=_run_quantized)


def _add_gptq(formats) -> None:
    p = formats.add_parser("gptq", help="GPTQ Int4/Int8 (AutoGPTQ v1 format), multimodal calibration",
                           description="Quantize the decoder's linears with GPTQ, layer by layer on "
                                       "calibration chats with images, into an AutoGPTQ v1 checkpoint.")
    _quant_common(p)
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric grid (Qwen's releases); --no-sym for zero points")
    p.add_argument("--desc-act", action="store_true", help="act-order: columns by decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.1, help="damping, a fraction of the mean Hessian diagonal")
    p.add_argument("--no-true-sequential", action="store_true",
                   help="calibrate all linears of a layer on float inputs (faster, slightly worse)")


def _add_awq(formats) -> None:
    p = formats.add_parser("awq", help="AWQ 4-bit (AutoAWQ gemm format), multimodal calibration",
                           description="Quantize the decoder's linears with AWQ (activation-aware scales, "
                                       "clip search, zero points) into an AutoAWQ gemm checkpoint.")
    _quant_common(p)


FORMATS = [_add_gptq, _add_awq, _add_onnx]


def register(sub) -> argparse.ArgumentParser:
    """Add the ``export`` command group to the top-level subparsers ``sub``."""
    p = sub.add_parser("export", help="write deployable artifacts (GPTQ, AWQ, ONNX vision tower)")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for add in FORMATS:
        add(formats)
    return p
