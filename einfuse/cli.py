"""The `einfuse` command: demo, compile a model from a Python file, parse/verify IR files."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings


def _load_model_file(path: str):
    """A Python file defining `model` and `example_inputs` (a tuple), optionally `example_kwargs`;
    or `get_model()` returning (model, args) or (model, args, kwargs)."""
    spec = importlib.util.spec_from_file_location("einfuse_user_model", path)
    if spec is None:
        raise SystemExit(f"einfuse: cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if hasattr(mod, "get_model"):
        got = mod.get_model()
        model, args, kwargs = (got + ({},))[:3] if len(got) == 2 else got
    elif hasattr(mod, "model") and hasattr(mod, "example_inputs"):
        model, args, kwargs = mod.model, mod.example_inputs, getattr(mod, "example_kwargs", {})
    else:
        raise SystemExit(f"einfuse: {path} must define `model` and `example_inputs`, or `get_model()`")
    return model, tuple(args) if isinstance(args, (tuple, list)) else (args,), dict(kwargs)


def cmd_compile(ns) -> int:
    import torch

    import einfuse

    model, args, kwargs = _load_model_file(ns.file)
    with torch.no_grad():
        cm = einfuse.compile(model, args, kwargs, dump_dir=ns.dump_dir, backend=ns.backend, check=ns.check)
    cm.explain()
    if ns.print_ir:
        print(cm.ir)
    return 0


def cmd_parse(ns) -> int:
    from einfuse.ir import ParseError, parse
    from einfuse.ir.verify import VerifyError, verify

    text = sys.stdin.read() if ns.file == "-" else open(ns.file).read()
    try:
        m = parse(text)
        verify(m)
    except (ParseError, VerifyError) as e:
        print(f"{ns.file}: {e}", file=sys.stderr)
        return 1
    if not ns.quiet:
        print(m, end="")
    return 0


def cmd_demo(ns) -> int:
    from .demo import run_demo

    return run_demo(dump_dir=ns.dump_dir, seq=ns.seq, model=ns.model)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="einfuse", description="Compile PyTorch models through an Einsum-cascade IR.")
    p.add_argument("--version", action="version", version=f"einfuse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="compile an example model, show IR dumps, check against eager, report")
    d.add_argument("--model", choices=("llama", "gpt2", "minilm"), default="llama")
    d.add_argument("--seq", type=int, default=32, help="sequence length of the example input")
    d.add_argument("--dump-dir", default="einfuse_dump", help="where the per-pass IR files go")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("compile", help="compile a model defined in a Python file and write the dumps")
    c.add_argument("file", help="a .py file defining `model` and `example_inputs`, or `get_model()`")
    c.add_argument("--dump-dir", default="einfuse_dump")
    c.add_argument("--backend", default=None, help="execution backend (default: einfuse's default)")
    c.add_argument("--check", action="store_true", help="check every pass's numerics on random inputs")
    c.add_argument("--print-ir", action="store_true", help="print the final IR")
    c.set_defaults(fn=cmd_compile)

    v = sub.add_parser("parse", help="parse and verify an IR file (or - for stdin), printing it back")
    v.add_argument("file")
    v.add_argument("-q", "--quiet", action="store_true", help="only report errors")
    v.set_defaults(fn=cmd_parse)
    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch/transformers deprecation noise
    return ns.fn(ns)


if __name__ == "__main__":
    sys.exit(main())
