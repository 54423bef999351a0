"""The README's main job: compile an example model, show the IR after every pass, check against eager,
print the report."""
from __future__ import annotations

import os

import torch


def _example(model: str, seq: int):
    from . import models

    g = torch.Generator().manual_seed(1)
    if model == "minilm":
        net, tok = models.minilm()
        batch = tok(["einfuse lowers every op to an extended Einsum.", "Kernels come from the IR."],
                    padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
        fresh = tok(["A second batch, different words.", "Fresh inputs check the compiled model."],
                    padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
        return net, (), dict(batch), (), dict(fresh)
    net = models.tiny_llama() if model == "llama" else models.tiny_gpt2()
    ids = torch.randint(0, 256, (1, seq), generator=g)
    fresh = torch.randint(0, 256, (1, seq), generator=g)
    return net, (ids,), {}, (fresh,), {}


def _first_tensor(out):
    leaves = torch.utils._pytree.tree_leaves(out)
    return next(x for x in leaves if isinstance(x, torch.Tensor))


def run_demo(dump_dir: str = "einfuse_dump", seq: int = 32, model: str = "llama", fusion_seq: int = 512) -> int:
    import einfuse

    from .passes.instruments import max_rel_error

    print(f"== einfuse demo: {model}, sequence length {seq}")
    net, args, kwargs, fresh_args, fresh_kwargs = _example(model, seq)
    with torch.no_grad():
        # Triton kernels, run under the interpreter on a CPU (the CPU default, backend="torch", runs a
        # generated torch program at eager's speed instead)
        cm = einfuse.compile(net, args, kwargs, dump_dir=dump_dir, backend="triton")
    print(f"\n== IR after every pass, in {dump_dir}/")
    for f in sorted(os.listdir(dump_dir)):
        if f.endswith(".ir"):
            with open(os.path.join(dump_dir, f)) as fh:
                header = fh.readline().strip()
            print(f"  {f:<28} {header.lstrip('# ')}")
    lines = str(cm.ir).splitlines()
    body = [ln for ln in lines if not ln.lstrip().startswith(("param ", "buffer ", "const "))]
    print(f"\n== final IR ({len(lines)} lines; first 40 without weight declarations)")
    print("\n".join(body[:40]))
    with torch.no_grad():
        got = _first_tensor(cm(*fresh_args, **fresh_kwargs))
        want = _first_tensor(net(*fresh_args, **fresh_kwargs))
    err = max_rel_error(got, want)
    status = "OK" if err <= 1e-5 else "MISMATCH"
    print(f"\n== check against eager PyTorch on fresh inputs: max relative error {err:.2e} (fp32 tolerance 1e-5) {status}")
    kdir = os.path.join(dump_dir, "kernels")
    if os.path.isdir(kdir):
        kernels = sorted(os.listdir(kdir))
        print(f"\n== {len(kernels)} Triton kernels in {kdir}/, e.g. {kernels[0] if kernels else '-'}:")
        dots = [k for k in kernels if "_mm" in k] or kernels
        if dots:
            with open(os.path.join(kdir, dots[0])) as f:
                print(f.read())
    print("== what was lowered")
    cm.explain()
    if cm.variant.backend == "triton":
        print("\n== memory traffic (measured under Triton's interpreter) and roofline model")
        print(cm.report(*fresh_args, **fresh_kwargs).text(top=12))
    if fusion_seq:
        from .fusion_table import measure, text

        print("\n== what fusion saves on a Llama layer (kernels; bytes measured under the interpreter)")
        print(text(measure(fusion_seq), fusion_seq))
    return 0 if status == "OK" else 1
