"""The ``qvl`` command line: run, chat, demo, serve, export, eval."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from qvl.bench.eval import register as register_eval
from qvl.export.cli import register as register_export
from qvl.runtime.errors import PromptTooLongError
from qvl.runtime.options import LoadOptions, option_names
from qvl.scripts.default_model import cache_dir, default_model_dir

log = logging.getLogger("qvl")


def _load(args):
    import qvl
    from qvl.runtime.loader import check_device

    check_device(args.device)  # before anything reads the checkpoint, as one line (a DeviceError)
    # an option left at None takes LoadOptions' default, or what --memory-budget allows
    return qvl.load(args.model, **{k: getattr(args, k) for k in option_names()
                                   if hasattr(args, k) and getattr(args, k) is not None})


def _gen_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _print_stats(engine, out=sys.stderr):
    from qvl.bench.probe import peak_rss_kb

    s = engine.last_stats
    print(f"[{s.prompt_tokens} prompt tokens, first token {s.prefill_s:.2f}s (vision {s.vision_s:.2f}s), "
          f"{s.new_tokens} new tokens at {s.decode_tok_s:.1f} tok/s, load {engine.load_s:.2f}s, "
          f"peak RSS {peak_rss_kb() / 1024:.0f} MB]", file=out)


def _user_message(prompt: str, images: list[str]) -> list[dict]:
    content = [{"type": "image", "image": img} for img in images] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def cmd_run(args) -> int:
    if args.boxes and len(args.image or []) != 1:
        raise SystemExit("qvl: error: --boxes draws on the one picture given with --image")
    engine = _load(args)
    h = engine.submit(_user_message(args.prompt, args.image or []), **_gen_kwargs(args))
    ids = []
    for tok, piece in h:
        if tok is not None:
            ids.append(tok)
        print(piece, end="", flush=True)
    print()
    engine.last_stats = h.stats
    _print_stats(engine)
    if args.boxes:
        _draw_answer_boxes(engine, args.image[0], engine.tokenizer.decode(ids, skip_special_tokens=False), args.boxes)
    return 0


def _draw_answer_boxes(engine, image_path: str, text: str, out: str) -> None:
    """The answer's grounding boxes, listed and drawn on the original picture (written atomically)."""
    from PIL import Image

    from qvl.runtime.boxes import draw_boxes, model_image_size, parse_boxes

    with Image.open(image_path) as im:
        im.load()
        boxes = parse_boxes(text, im.size, model_type=engine.model.cfg.model_type,
                            resized_size=model_image_size(im.size, engine.processor))
        drawn = draw_boxes(im, boxes)
    for b in boxes:
        print(f"box {b.label or '-'}: ({b.x1:.0f}, {b.y1:.0f}), ({b.x2:.0f}, {b.y2:.0f})", file=sys.stderr)
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        drawn.save(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed save leaves no half-written picture behind
    print(f"qvl run: {len(boxes)} boxes drawn on {path}", file=sys.stderr)


def cmd_chat(args) -> int:
    engine = _load(args)
    history: list[dict] = []
    pending_images: list[str] = list(args.image or [])
    print("qvl chat: type a message; '/image PATH' attaches an image to the next message; '/reset'; Ctrl-D quits.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line.startswith("/image "):
            pending_images.append(line[7:].strip())
            continue
        if line == "/reset":
            history, pending_images = [], []
            continue
        turn = _user_message(line, pending_images)
        pending_images = []
        answer, dropped = _answer(engine, history, turn, _gen_kwargs(args))
        if answer is None:
            continue
        print()
        if dropped:
            print(f"qvl chat: the conversation outgrew the KV cache ({engine.model.max_seq} tokens, --max-seq-len): "
                  f"dropped the oldest {dropped} of {len(history) // 2} exchanges; /reset starts afresh",
                  file=sys.stderr)
        history = history[2 * dropped:] + turn + [{"role": "assistant", "content": answer}]
        _print_stats(engine)


def _answer(engine, history: list[dict], turn: list[dict], gen: dict) -> tuple[str | None, int]:
    """Stream the answer to ``turn`` after ``history`` (user, assistant pairs), leaving out the
    oldest pairs while the conversation does not fit the KV cache: (the answer, or None after an
    error, and the pairs left out)."""
    for dropped in range(len(history) // 2 + 1):
        answer = ""
        try:
            for piece in engine.stream(history[2 * dropped:] + turn, **gen):
                answer += piece
                print(piece, end="", flush=True)
            return answer, dropped
        except PromptTooLongError as e:
            error = e
        except ValueError as e:  # a bad image: report it and keep the session
            print(f"error: {e}", file=sys.stderr)
            return None, 0
    print(f"error: {error}", file=sys.stderr)  # the new message alone does not fit
    return None, 0


def cmd_demo(args) -> int:
    from qvl.export.synth import demo_pictures

    model = args.model or default_model_dir()
    workdir = Path(args.workdir or cache_dir())
    workdir.mkdir(parents=True, exist_ok=True)
    args.model = str(model)
    engine = _load(args)
    print(f"model: {model}")
    for k, (img, questions) in enumerate(demo_pictures()):
        path = workdir / f"demo{'' if k == 0 else k}.png"
        img.save(path)
        print(f"\nimage: {path} ({img.width}x{img.height})")
        for q, drawn in questions:
            answer = engine.generate(_user_message(q, [str(path)]), **_gen_kwargs(args))
            print(f"Q: {q}\nA: {answer!r}  (drawn: {drawn})")
            _print_stats(engine, sys.stdout)
    return 0


def cmd_serve(args) -> int:
    import os

    try:  # before the model loads: a missing extra fails at once
        from qvl.runtime import server
    except ImportError as e:
        raise ImportError(f"qvl serve needs FastAPI and uvicorn: pip install 'qvl[serve]' ({e})") from None
    from qvl.runtime.media_policy import MediaPolicy
    from qvl.runtime.openai_api import generation_defaults

    media = MediaPolicy.make(args.allowed_local_media_path, args.allow_remote)
    engine = _load(args)
    engine.fetch_policy = dataclasses.replace(engine.fetch_policy, allow_remote=args.allow_remote,
                                              allow_private_addresses=args.allow_private_addresses)
    settings = server.ServeSettings(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key or os.environ.get("QVL_API_KEY") or None, media=media,
        request_timeout_s=args.request_timeout, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        default_max_tokens=args.default_max_tokens, sampling_defaults=generation_defaults(args.model),
        max_model_len=engine.model.max_seq)
    return server.run_server(engine, settings, args.host, args.port, args.verbose)


def add_serve_options(sp) -> None:
    d = LoadOptions()
    sp.add_argument("model", help="checkpoint directory")
    add_load_options(sp)
    sp.add_argument("--max-batch", type=int, default=4, help="KV-cache slots: requests decoded side by side")
    sp.add_argument("--max-queue", type=int, default=d.max_queue, help="requests that may wait; one more gets 429")
    sp.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk)
    sp.add_argument("--decode-kv", choices=["full", "live"], default=d.decode_kv)
    sp.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=d.cuda_graphs)
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--served-model-name", help="the name clients pass as `model` (default: the directory's)")
    sp.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: $QVL_API_KEY)")
    sp.add_argument("--allowed-local-media-path", metavar="DIR",
                    help="allow file:// images and videos under DIR (symlinks resolved); default: none")
    sp.add_argument("--allow-remote", action="store_true", help="allow http(s) image and video URLs")
    sp.add_argument("--allow-private-addresses", action="store_true",
                    help="with --allow-remote: also fetch from loopback, private and link-local addresses")
    sp.add_argument("--request-timeout", type=float, default=600.0, help="seconds; a longer request is stopped")
    sp.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (MiB)")
    sp.add_argument("--default-max-tokens", type=int, default=512,
                    help="answer length when a request sets neither max_tokens nor max_completion_tokens")


def add_load_options(sp) -> None:
    """The flags of ``qvl.load``'s options that a one-user command needs; defaults from LoadOptions."""
    d = LoadOptions()
    sp.add_argument("--device", default=d.device)
    sp.add_argument("--dtype", default=d.dtype, help="float32 | bfloat16 | float16 | auto")
    sp.add_argument("--vision-backend", default=d.vision_backend, choices=["torch", "onnx"],
                    help="onnx: run MODEL/vision.onnx in onnxruntime (made by `qvl export onnx`)")
    sp.add_argument("--quant-kernel", default=d.quant_kernel,
                    choices=["auto", "qvl", "qvl-a8", "int4pack", "dequant"],
                    help="quantized checkpoints: the linears' path (auto: the fastest that runs here)")
    sp.add_argument("--max-seq-len", type=int, default=None,
                    help=f"the KV cache's tokens per slot (default {d.max_seq_len}, or what --memory-budget allows)")
    sp.add_argument("--memory-budget", metavar="SIZE", default=d.memory_budget,
                    help="e.g. 4GB: plan the load to peak under it, choosing --max-seq-len where not given; "
                         "refuse what does not fit (see `qvl plan`)")
    sp.add_argument("--head", default=d.head, choices=["checkpoint", "int8", "int4"],
                    help="the output head: the checkpoint's own, or quantized at load (a fifth fewer bytes a "
                         "2B decode step reads)")
    sp.add_argument("--vision-quant", default=d.vision_quant, choices=["none", "int8"],
                    help="int8: the torch vision tower's linears in 8 bits, rounded at load (about half its bytes)")
    sp.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", "int8"],
                    help="int8: the KV cache in 8 bits with a scale per head and position (about half its bytes)")


def cmd_plan(args) -> int:
    import json

    from qvl.runtime.plan import make_plan, read_checkpoint

    if args.memory_budget is None:
        raise ValueError("qvl plan needs --budget SIZE (e.g. 4GB)")
    plan = make_plan(read_checkpoint(Path(args.model)), args.memory_budget, dtype=args.dtype, head=args.head,
                     quant_kernel=args.quant_kernel, device=args.device, vision_backend=args.vision_backend,
                     max_seq_len=args.max_seq_len, max_batch=args.max_batch, max_pixels=args.max_pixels,
                     vision_quant=getattr(args, "vision_quant", "none"),
                     kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.describe())
    return 0 if plan.fits else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvl", description="Qwen2-VL edge runtime")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, model_required=True):
        if model_required:
            sp.add_argument("model", help="checkpoint directory")
        else:
            sp.add_argument("--model", help="checkpoint directory (default: the embedded default)")
        sp.add_argument("--image", action="append", help="image path (repeatable)")
        add_load_options(sp)
        sp.add_argument("--max-new-tokens", type=int, default=128)
        sp.add_argument("--temperature", type=float, default=0.0)
        sp.add_argument("--top-k", type=int, default=0)
        sp.add_argument("--top-p", type=float, default=1.0)
        sp.add_argument("--repetition-penalty", type=float, default=1.0)
        sp.add_argument("--seed", type=int)

    r = sub.add_parser("run", help="answer one prompt")
    common(r)
    r.add_argument("prompt")
    r.add_argument("--boxes", metavar="OUT.png", help="draw the answer's grounding boxes on the --image picture")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("chat", help="interactive multi-turn chat")
    common(c)
    c.set_defaults(func=cmd_chat)
    dm = sub.add_parser("demo", help="draw a picture, ask about it, print answers, timings, memory")
    common(dm, model_required=False)
    dm.add_argument("--workdir", help="where to write the demo image")
    dm.set_defaults(func=cmd_demo, max_new_tokens=24)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (pip install 'qvl[serve]')")
    add_serve_options(sv)
    sv.set_defaults(func=cmd_serve)
    pl = sub.add_parser("plan", help="what a checkpoint needs and what fits a memory budget (reads headers only)")
    pl.add_argument("model", help="checkpoint directory")
    add_load_options(pl)
    pl.add_argument("--budget", dest="memory_budget", metavar="SIZE", help="e.g. 4GB, 3.5GiB (GB = 10^9 bytes)")
    pl.add_argument("--max-pixels", type=int, help="the picture to keep room for (default 448 x 448)")
    pl.add_argument("--max-batch", type=int, help="KV-cache slots (default 1)")
    pl.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    pl.set_defaults(func=cmd_plan)
    register_export(sub)
    register_eval(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, ImportError) as e:
        print(f"qvl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
