"""The ``qvl`` command line: run, chat, demo, export, eval."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qvl.bench.eval import register as register_eval
from qvl.export.cli import register as register_export
from qvl.runtime.options import LoadOptions, option_names
from qvl.scripts.default_model import cache_dir, default_model_dir

log = logging.getLogger("qvl")


def _load(args):
    import qvl

    return qvl.load(args.model, **{k: getattr(args, k) for k in option_names() if hasattr(args, k)})


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
    engine = _load(args)
    for piece in engine.stream(_user_message(args.prompt, args.image or []), **_gen_kwargs(args)):
        print(piece, end="", flush=True)
    print()
    _print_stats(engine)
    return 0


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
        answer = ""
        try:
            for piece in engine.stream(history + turn, **_gen_kwargs(args)):
                answer += piece
                print(piece, end="", flush=True)
        except ValueError as e:  # bad image, prompt too long: report and keep the session
            print(f"error: {e}", file=sys.stderr)
            continue
        print()
        history += turn + [{"role": "assistant", "content": answer}]
        _print_stats(engine)


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


def add_load_options(sp) -> None:
    """The flags of ``qvl.load``'s options that a one-user command needs; defaults from LoadOptions."""
    d = LoadOptions()
    sp.add_argument("--device", default=d.device)
    sp.add_argument("--dtype", default=d.dtype, help="float32 | bfloat16 | float16 | auto")
    sp.add_argument("--vision-backend", default=d.vision_backend, choices=["torch", "onnx"],
                    help="onnx: run MODEL/vision.onnx in onnxruntime (made by `qvl export onnx`)")
    sp.add_argument("--quant-kernel", default=d.quant_kernel, choices=["auto", "qvl", "int4pack", "dequant"],
                    help="quantized checkpoints: the linears' path (auto: the fastest that runs here)")
    sp.add_argument("--max-seq-len", type=int, default=d.max_seq_len)


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
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("chat", help="interactive multi-turn chat")
    common(c)
    c.set_defaults(func=cmd_chat)
    dm = sub.add_parser("demo", help="draw a picture, ask about it, print answers, timings, memory")
    common(dm, model_required=False)
    dm.add_argument("--workdir", help="where to write the demo image")
    dm.set_defaults(func=cmd_demo, max_new_tokens=24)
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
