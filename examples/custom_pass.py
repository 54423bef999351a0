"""Write a pass, plug it into the pipeline, and see it in the dumps (docs/passes.md explains)."""
import math
import os
import tempfile

import torch

import einfuse
from einfuse.ir import Call, Const
from einfuse.ir.expr import rewrite
from einfuse.passes import Pass, default_pipeline


class Exp2(Pass):
    """exp(x) -> exp2(x * log2(e)): the form GPUs evaluate natively."""

    name = "exp_to_exp2"

    def run(self, module):
        def visit(e):
            if isinstance(e, Call) and e.op == "exp":
                return Call("exp2", (Call("mul", (e.args[0], Const(1 / math.log(2)))),))
            return None

        return module.replace(body=tuple(
            op.replace(expr=rewrite(op.expr, visit)) if hasattr(op, "expr") else op for op in module.body))


if __name__ == "__main__":
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Softmax(-1)).eval()
    dump = tempfile.mkdtemp(prefix="einfuse_")
    cm = einfuse.compile(model, (torch.randn(4, 16),), passes=default_pipeline() + [Exp2()], dump_dir=dump,
                         check=True)
    x = torch.randn(4, 16)
    print("max error vs eager:", (cm(x) - model(x)).abs().max().item())
    print("dumps:", sorted(os.listdir(dump)))
    print(open(os.path.join(dump, sorted(f for f in os.listdir(dump) if "exp_to_exp2" in f)[0])).read())
