"""The `einfuse` command: demo, compile a model from a Python file, parse/verify IR files."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings


class UsageError(Exception):
    """A mistake in how the command was called (a missing file): one line on stderr, exit code 2."""


def _readable(path: str) -> None:
    if path != "-" and not os.path.isfile(path):
        why = "is a directory" if os.path.isdir(path) else "no such file"
        raise UsageError(f"einfuse: cannot read {path}: {why}")


def _load_model_file(path: str):
    """A Python file defining `model` and `example_inputs` (a tuple), optionally `example_kwargs`;
    or `get_model()` returning (model, args) or (model, args, kwargs)."""
    _readable(path)
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


def _compile_file(ns):
    import torch

    import einfuse

    model, args, kwargs = _load_model_file(ns.file)
    with torch.no_grad():
        return einfuse.compile(model, args, kwargs, dump_dir=ns.dump_dir, backend=getattr(ns, "backend", None),
                               check=getattr(ns, "check", False))


def _eager_only(cm, what: str) -> int | None:
    """When the model runs in eager PyTorch there is nothing to report or check: say so and why (exit 1)."""
    if cm.variant.fallback is None:
        return None
    print(f"einfuse: no {what}: {cm.variant.fallback.splitlines()[0]} — the model runs in eager PyTorch",
          file=sys.stderr)
    return 1


def cmd_compile(ns) -> int:
    from einfuse.passes import PassNumericsError

    try:
        cm = _compile_file(ns)
    except PassNumericsError as e:
        print(f"einfuse: numeric check failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    cm.explain()
    if ns.check and cm.variant.fallback is None:
        checked = [t["max_rel_error"] for t in cm.variant.timings if t.get("max_rel_error") is not None]
        if checked:
            print(f"numeric check: ran after each of {len(checked)} passes on random inputs, passed "
                  f"(largest relative change {max(checked):.1e})")
        else:
            print("numeric check: not run (the pipeline came from the cache)")
    if ns.print_ir:
        if cm.variant.fallback is not None:
            return _eager_only(cm, "IR")
        print(cm.ir)
    if ns.stages:
        return _dump_stages(ns)
    return 0


def _dump_stages(ns) -> int:
    """`compile --stages G`: the captured module cut into G layer-group stages (passes.stages), written to
    DUMP_DIR/stages/ and listed."""
    import torch

    from .frontend.capture import export
    from .frontend.lower import lower_graph
    from .passes import PassError
    from .passes.stages import partition_stages

    model, args, kwargs = _load_model_file(ns.file)
    with torch.no_grad():
        cap = export(model, args, kwargs)
    lowered = lower_graph(cap.gm, cap.kinds, type(model).__name__)
    try:
        stages = partition_stages(lowered.module, lowered.instances, ns.stages)
    except (ValueError, PassError) as e:
        print(e, file=sys.stderr)
        return 2
    paths = stages.dump(os.path.join(ns.dump_dir, "stages"))
    for g, s in enumerate(stages.stages):
        print(f"stage {g}: layers {s.layers[0]}..{s.layers[1] - 1} ({len(s.module.body)} ops); from earlier "
              f"stages: {', '.join(s.carried) or '-'}")
    print(f"wrote {paths[0]} and {len(paths) - 1} stage files")
    return 0


def cmd_report(ns) -> int:
    cm = _compile_file(ns)
    failed = _eager_only(cm, "report")
    if failed is not None:
        return failed
    print(cm.report().text(top=ns.top))
    print(f"report.json and roofline.png in {ns.dump_dir}/")
    return 0


def print_gpu_checks(records) -> bool:
    """A table of ahead-of-time GPU compile results; True when every kernel compiled without spills."""
    print(f"{'kernel':<44}{'arch':>6}{'ok':>5}{'regs':>6}{'spills':>8}{'smem':>8}{'tensor core':>13}")
    good = True
    for r in records:
        good &= bool(r.ok) and not r.spills
        print(f"{r.name[:43]:<44}{'sm_' + str(r.arch) + ('a' if r.arch == 90 else ''):>6}{'yes' if r.ok else 'NO':>5}"
              f"{r.registers if r.registers is not None else '-':>6}{r.spills if r.spills is not None else '-':>8}"
              f"{r.shared_bytes if r.shared_bytes is not None else '-':>8}{'yes' if r.tensor_core else 'no':>13}")
        if not r.ok and r.error:
            print(f"    {r.error.splitlines()[0]}")
    return good


def cmd_check_gpu(ns) -> int:
    cm = _compile_file(ns)
    failed = _eager_only(cm, "GPU check")
    if failed is not None:
        return failed
    return 0 if print_gpu_checks(cm.check_gpu(archs=tuple(ns.arch))) else 1


def cmd_parse(ns) -> int:
    from einfuse.ir import ParseError, parse
    from einfuse.ir.verify import VerifyError, verify

    _readable(ns.file)
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

    return run_demo(dump_dir=ns.dump_dir, seq=ns.seq, model=ns.model, fusion_seq=ns.fusion_seq)


def load_causal_lm(name: str):
    """(model in eval mode, tokenizer) for `einfuse generate`: "smollm2" (einfuse.hub), a `.gguf` file
    (transformers reads it with the `gguf` package) or a local transformers folder."""
    if name == "smollm2":
        from .hub import smollm2

        return smollm2()
    if not (name.endswith(".gguf") and os.path.isfile(name)) and not os.path.isdir(name):
        raise UsageError(f"einfuse: {name} is not a transformers model folder, a .gguf file or 'smollm2'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isdir(name):
        return (AutoModelForCausalLM.from_pretrained(name, local_files_only=True).eval(),
                AutoTokenizer.from_pretrained(name, local_files_only=True))
    folder, file = os.path.split(os.path.abspath(name))
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder, gguf_file=file))


def cmd_generate(ns) -> int:
    import time

    from .serve import LLM

    model, tokenizer = load_causal_lm(ns.model)
    start = time.perf_counter()
    llm = LLM(model, tokenizer, backend=ns.backend)
    print(f"einfuse: {type(llm.runner).__name__} ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    try:
        for _, text in llm.stream(ns.prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                                  top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed):
            print(text, end="", flush=True)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    generated = sum(s.tokens_generated for s in llm.stats)
    prompt = sum(s.tokens_prefilled for s in llm.stats)
    print()
    print(f"einfuse: {generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s "
          f"({prompt} prompt tokens, {len(llm.stats)} steps, {type(llm.runner).__name__})", file=sys.stderr)
    return 0


def cmd_serve_sim(ns) -> int:
    """Replay a trace through einfuse.LLM under each policy: a table (modelled H100 times) and PNG plots."""
    import torch

    from .models import tiny_decoder
    from .serve import sim

    try:
        if ns.trace == "bursty":
            trace = sim.bursty_trace(ns.requests, seed=ns.seed, rate=ns.rate, prompt=(8, 160), output=(4, 24))
        else:
            _readable(ns.trace)
            trace = sim.read_trace(ns.trace)
        torch.set_num_threads(1)
        if ns.model == "moe":
            model = tiny_decoder("mixtral", num_hidden_layers=ns.layers, num_local_experts=ns.experts,
                                 num_experts_per_tok=2, max_position_embeddings=8192)
        else:
            model = tiny_decoder("llama", num_hidden_layers=ns.layers, max_position_embeddings=8192)
        results = [sim.replay(model, trace, policy, ns.groups, ns.budget, ns.max_running, seed=ns.seed)
                   for policy in ns.policy or sim.POLICIES]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"einfuse serve-sim: {len(trace)} requests ({ns.trace}), tiny {ns.model} model ({ns.layers} layers"
          f"{f', {ns.experts} experts top-2' if ns.model == 'moe' else ''}), random weights, run eagerly layer by "
          f"layer on this CPU")
    print(sim.table(results))
    for path in sim.plots(results, ns.out, f"({ns.model}, {len(trace)} requests)"):
        print(f"wrote {path}")
    return 0


def cmd_run_dist(ns) -> int:
    """`torchrun --standalone --nproc-per-node N script args...`: a script that compiles with dist=einfuse.Dist(...)."""
    import subprocess

    _readable(ns.script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ns.nproc),
           ns.script, *ns.args]
    print("einfuse run-dist:", " ".join(cmd[1:]), file=sys.stderr)
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="einfuse", description="Compile PyTorch models through an Einsum-cascade IR.")
    p.add_argument("--version", action="version", version=f"einfuse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="compile an example model, show IR dumps, check against eager, report")
    d.add_argument("--model", choices=("llama", "gpt2", "minilm"), default="llama")
    d.add_argument("--seq", type=int, default=32, help="sequence length of the example input")
    d.add_argument("--dump-dir", default="einfuse_dump", help="where the per-pass IR files go")
    d.add_argument("--fusion-seq", type=int, default=512,
                   help="tokens for the fusion before/after table of a Llama layer (0 skips it)")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("compile", help="compile a model defined in a Python file and write the dumps")
    c.add_argument("file", help="a .py file defining `model` and `example_inputs`, or `get_model()`")
    c.add_argument("--dump-dir", default="einfuse_dump")
    c.add_argument("--backend", default=None, help="execution backend (default: einfuse's default)")
    c.add_argument("--check", action="store_true", help="check every pass's numerics on random inputs")
    c.add_argument("--print-ir", action="store_true", help="print the final IR")
    c.add_argument("--stages", type=int, default=0, metavar="G",
                   help="also cut the captured module into G layer-group stages (DUMP_DIR/stages/)")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("report", help="measured bytes per kernel, FLOPs and an H100 roofline model")
    r.add_argument("file", help="a .py file defining `model` and `example_inputs`, or `get_model()`")
    r.add_argument("--dump-dir", default="einfuse_dump")
    r.add_argument("--top", type=int, default=20, help="kernels to list")
    r.set_defaults(fn=cmd_report)

    g = sub.add_parser("check-gpu", help="compile every kernel ahead of time for sm_80/sm_90a (no GPU needed)")
    g.add_argument("file", help="a .py file defining `model` and `example_inputs`, or `get_model()`")
    g.add_argument("--arch", type=int, action="append", default=None, help="CUDA arch (80, 90); repeatable")
    g.add_argument("--dump-dir", default=None)
    g.set_defaults(fn=cmd_check_gpu)

    n = sub.add_parser("generate", help="stream a completion of a prompt from a causal LM (einfuse.LLM)")
    n.add_argument("model", help="a transformers model folder, a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct)")
    n.add_argument("--prompt", required=True)
    n.add_argument("--max-new-tokens", type=int, default=64)
    n.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    n.add_argument("--top-k", type=int, default=None)
    n.add_argument("--top-p", type=float, default=None)
    n.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    n.add_argument("--backend", default=None, choices=("torch", "triton", "reference", "eager"),
                   help="compiled programs' backend (default: triton on CUDA, else torch); 'eager' runs the "
                        "transformers model as it is (the reference runner)")
    n.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve-sim", help="replay a request trace under scheduling policies (none, chunked, "
                                         "layered): TTFT/TBT/expert bytes on a modelled H100, PNG plots")
    s.add_argument("--policy", action="append", choices=("none", "chunked", "layered"),
                   help="repeatable (default: all three)")
    s.add_argument("--groups", type=int, default=4, help="layer groups of the layered policy")
    s.add_argument("--trace", default="bursty", help="'bursty' (generated) or a JSONL trace file")
    s.add_argument("--requests", type=int, default=16, help="requests of the generated trace")
    s.add_argument("--rate", type=float, default=200.0, help="mean arrivals per second of the generated trace")
    s.add_argument("--budget", type=int, default=64, help="token budget per step (max_batch_tokens)")
    s.add_argument("--max-running", type=int, default=None, help="most requests running at once (the decode "
                   "batch; at most the budget)")
    s.add_argument("--model", choices=("moe", "dense"), default="moe", help="a tiny Mixtral or a tiny Llama")
    s.add_argument("--layers", type=int, default=8)
    s.add_argument("--experts", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="serve_sim", help="where the PNG plots go")
    s.set_defaults(fn=cmd_serve_sim)

    t = sub.add_parser("run-dist", help="run a script as N ranks (torchrun); it compiles with dist=einfuse.Dist(tp=N)")
    t.add_argument("--nproc", type=int, default=2, help="number of ranks (processes)")
    t.add_argument("script")
    t.add_argument("args", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_run_dist)

    v = sub.add_parser("parse", help="parse and verify an IR file (or - for stdin), printing it back")
    v.add_argument("file")
    v.add_argument("-q", "--quiet", action="store_true", help="only report errors")
    v.set_defaults(fn=cmd_parse)
    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    if getattr(ns, "arch", 0) is None:
        ns.arch = [80, 90]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch/transformers deprecation noise
    try:
        return ns.fn(ns)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
