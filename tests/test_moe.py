"""The MoE kernel kind: transformers' experts modules (Mixtral: top-2 renormalized; Qwen2-MoE: top-k without
renormalization, a shared expert behind a sigmoid gate) compile to two `moe` kernels and match eager
PyTorch through both backends (the torch backend's generated code and Triton under the interpreter);
experts no token routes to are skipped; the kernels compile for sm_80/sm_90a without spills and on the
tensor cores; a decode step's measured bytes stay within 1.1x of the activated experts' weights plus the
activations. Tolerance (f32): max |got - want| / max |want| <= 1e-5 on fresh inputs."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import float32_matmul_precision

import einfuse
from einfuse.ir import Opaque
from einfuse.kinds.moe import activated_experts, expert_bytes, expert_bytes_from_counts, expert_param_bytes
from einfuse.models import tiny_decoder

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

TOL = 1e-5
HIDDEN = 64
ROUTING_OPAQUE = {"aten.sort.default", "aten.histc.default", "aten.index_put.default",
                  "transformers.grouped_mm_fallback.default"}


def rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def moe_layer(family: str, **config):
    return tiny_decoder(family, num_hidden_layers=1, **config).model.layers[0].mlp


def moe_kernels(cm) -> list:
    return [k for k in cm.ir.kernels if k.kind == "moe"]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def family(request):
    return request.param


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_experts_compile_to_the_moe_kind_and_match_eager(family, backend):
    layer = moe_layer(family)
    cm = einfuse.compile(layer, (torch.randn(2, 5, HIDDEN),), backend=backend)
    kernels = moe_kernels(cm)
    assert [k.roles for k in kernels] == [("gate_up", "act"), ("down", "combine")], cm.ir
    assert not ROUTING_OPAQUE & {op.target for op in cm.ir.body if isinstance(op, Opaque)}
    explanation = cm.explain(print_it=False)
    assert not ROUTING_OPAQUE & set(explanation.fallbacks), explanation.text
    with torch.no_grad():
        for k, shape in enumerate([(2, 5, HIDDEN), (2, 5, HIDDEN), (2, 5, HIDDEN)]):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + k))
            assert rel(cm(x), layer(x)) <= TOL


def test_one_token_many_blocks_and_an_expert_nobody_routes_to():
    """M = 1 (decode), 37 tokens (three token blocks, the last ragged), and an expert the router never
    picks (its kernels' programs load none of its weights), under the interpreter."""
    layer = moe_layer("mixtral", num_local_experts=6)
    with torch.no_grad():
        layer.gate.weight[5] = -1.0  # positive inputs: expert 5's logit is always the lowest
    for tokens in (1, 37):
        x = torch.rand(1, tokens, HIDDEN) + 0.1
        cm = einfuse.compile(layer, (x,), backend="triton")
        with torch.no_grad():
            _, _, ids = layer.gate(x.reshape(-1, HIDDEN))
            assert 5 not in ids
            assert rel(cm(x), layer(x)) <= TOL
            rep = cm.report(x, eager=False)
        up = next(k for k in rep.kernels if any(s.startswith("moe_up") for s in k.statements))
        per_expert = 2 * 2 * 128 * HIDDEN * 4 // 2  # gate + up halves: [2I, H] f32, I = 128
        assert up.bytes_loaded < (activated_experts(ids, 6) * per_expert) * 1.1 + tokens * 6 * 8 * HIDDEN * 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_gathers_each_experts_tokens(backend):
    """150 tokens (three token blocks): the gate/up kernel gathers each expert's routed tokens into blocks
    of its own (permutation by expert), so it loads an expert's gate/up weights once per 64 of its tokens,
    not once per token block that has one; an expert nobody routes to loads nothing; matches eager."""
    layer = moe_layer("mixtral", num_local_experts=6)
    with torch.no_grad():
        layer.gate.weight[5] = -1.0  # positive inputs: expert 5's logit is always the lowest
    tokens, inputs = 150, [torch.rand(1, 150, HIDDEN, generator=torch.Generator().manual_seed(k)) + 0.1 for k in range(2)]
    cm = einfuse.compile(layer, (inputs[0],), backend=backend)
    with torch.no_grad():
        for x in inputs:
            assert rel(cm(x), layer(x)) <= TOL
    if backend != "triton":
        return
    x = inputs[0]
    with torch.no_grad():
        _, _, ids = layer.gate(x.reshape(-1, HIDDEN))
        rep = cm.report(x, eager=False)
    assert 5 not in ids
    counts = torch.bincount(ids.reshape(-1), minlength=6)
    per_expert, n_tiles, chunks = 2 * 128 * HIDDEN * 4, 2, (counts + 63) // 64  # gate+up [2I, H] f32; I = 128
    gathered = int(chunks.sum()) * per_expert
    by_block = sum(bool((ids[b:b + 64] == e).any()) for b in range(0, tokens, 64) for e in range(6)) * per_expert
    # activations: each routed token's state once per intermediate tile, the routing column scanned per block
    activations = n_tiles * 2 * tokens * HIDDEN * 4 + 6 * n_tiles * (1 + int(chunks.max())) * tokens * 4
    up = next(k for k in rep.kernels if any(s.startswith("moe_up") for s in k.statements))
    assert up.bytes_loaded <= gathered + activations, (up.bytes_loaded, gathered, activations)
    # token-order blocks load an expert's tiles once per block with a token routed to it, besides the same rows
    assert up.bytes_loaded < by_block + n_tiles * 2 * tokens * HIDDEN * 4, (up.bytes_loaded, by_block)


def test_unrecognized_experts_say_why_and_still_match():
    """A GELU expert activation is not the SwiGLU the kind runs: lowered op by op, explained."""
    layer = moe_layer("mixtral", hidden_act="gelu")
    x = torch.randn(2, 3, HIDDEN)
    for _ in range(2):  # the second compile is a pipeline-cache hit: the explanation is kept with the entry
        cm = einfuse.compile(layer, (x,), backend="torch")
        assert not moe_kernels(cm)
        text = cm.explain(print_it=False).text
        assert "MoE experts" in text and "SiLU" in text, text
    with torch.no_grad():
        assert rel(cm(x), layer(x)) <= TOL


def test_expert_bytes_counts_each_activated_expert_once():
    per = expert_param_bytes(512, 1024)
    assert per == 3 * 512 * 1024 * 4
    assert expert_param_bytes(512, 1024, torch.bfloat16) == per // 2
    ids = torch.tensor([[0, 3], [3, 0], [7, 3]])
    assert activated_experts(ids, 8) == 3
    assert expert_bytes(ids, 8, per) == 3 * per
    assert expert_bytes(torch.tensor([[8, -1]]), 8, per) == 0  # sentinels and padding
    assert expert_bytes_from_counts([2, 0, 0, 3, 0, 0, 0, 1], per) == 3 * per


def test_decode_step_bytes_within_activated_experts():
    """One token, top-2 of 8: measured bytes of the MoE kernels <= 1.1 x (the two experts' weights +
    activations), and far below every expert's weights."""
    from bench_moe_bytes import measure

    r = measure(tokens=1, hidden=128, intermediate=256, experts=8, top_k=2)
    assert r["active"] == 2
    assert r["max_rel_error"] <= TOL
    assert r["ratio"] <= 1.1, r
    assert r["measured"] < 0.3 * r["all_experts"], r


@pytest.mark.slow  # four kernels, two shapes, two archs: ~60 s cold
def test_moe_kernels_compile_for_sm80_sm90a():
    """The grouped GEMMs (tf32 for f32 operands, as torch under 'high' precision; and bf16) compile for
    sm_80 and sm_90a with no spills and tensor-core instructions."""
    checks = []
    for shape in ((2, 5, HIDDEN), (1, 150, HIDDEN)):  # decode, and prefill (tokens gathered by expert)
        with float32_matmul_precision("high"):
            cm = einfuse.compile(moe_layer("mixtral"), (torch.randn(*shape),), backend="triton")
            checks += [c for c in cm.check_gpu(archs=(80, 90)) if "_moe_moe_" in c.name]
        bf = moe_layer("mixtral").to(torch.bfloat16)
        cm = einfuse.compile(bf, (torch.randn(*shape, dtype=torch.bfloat16),), backend="triton")
        checks += [c for c in cm.check_gpu(archs=(80, 90)) if "_moe_moe_" in c.name]
    assert len(checks) == 16, checks
    for c in checks:
        assert c.ok, f"{c.name} on sm_{c.arch}:\n{c.error}"
        assert c.spills == 0 and c.tensor_core, c


def test_olmoe_model_compiles_its_experts_to_the_moe_kind_and_matches_eager():
    """OLMoE (top-2 of 8 without renormalization, q/k norms): the whole tiny model (2 layers) on the torch
    backend; every layer's experts become the two moe kernels; logits match eager."""
    from einfuse.models import token_inputs

    model = tiny_decoder("olmoe")
    cm = einfuse.compile(model, kwargs=token_inputs(0), backend="torch")
    assert [k.roles for k in moe_kernels(cm)] == [("gate_up", "act"), ("down", "combine")] * 2, cm.ir
    assert not ROUTING_OPAQUE & {op.target for op in cm.ir.body if isinstance(op, Opaque)}
    with torch.no_grad():
        for k in range(1, 3):
            inputs = token_inputs(k)
            assert rel(cm(**inputs).logits, model(**inputs).logits) <= TOL


def test_mixtral_decoder_through_triton_runs_its_experts_in_the_moe_kind():
    """A whole decoder: the post-attention RMSNorm is fused into the experts' gate/up operand (a product of
    more than two factors), which the kind takes as its token-side operand; it crashed at kernel generation."""
    from einfuse.models import tiny_decoder

    model = tiny_decoder("mixtral", num_hidden_layers=2)
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    cm = einfuse.compile(model, (ids,), backend="triton")
    prod = cm._variants[0].ir.producers()
    ups = [prod[k.members[0]] for k in cm._variants[0].ir.kernels if k.kind == "moe" and k.roles[0] == "gate_up"]
    assert len(ups) == 2 and all("rsqrt" in str(s.expr) for s in ups)  # the norm is the kernel's prologue
    with torch.no_grad():
        for seed in (0, 1):
            x = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(seed))
            assert rel(cm(x).logits, model(x).logits) <= TOL


def test_torch_backend_runs_the_experts_routed():
    """The torch backend reads the MoE kernel pair back as routed experts (each expert on the rows routed to it,
    as transformers' eager experts): one `rt.moe` call per layer, no dense (token, expert) GEMM; logits equal
    eager. A chain whose intermediate another statement reads runs statement by statement."""
    from einfuse.codegen.torch_moe import moe_plans
    from einfuse.runtime.torch_backend import torch_backend

    model = tiny_decoder("mixtral", num_hidden_layers=2)
    ids = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    cm = einfuse.compile(model, (ids,), backend="torch")
    run = cm._variants[0].run
    assert run.source.count("rt.moe(") == 2 and "moe_up =" not in run.source, run.source
    with torch.no_grad():
        for seed in (0, 1):
            x = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(seed))
            assert rel(cm(x).logits, model(x).logits) <= TOL
    ir = cm._variants[0].ir
    assert len(moe_plans(ir)) == 2
    # the activation also read by a new output: no routed plan for that layer (its value is needed whole)
    act = next(k.members[1] for k in ir.kernels if k.kind == "moe" and k.roles[0] == "gate_up")
    leaky = ir.replace(outputs=ir.outputs + (act,))
    src = torch_backend(leaky).source
    assert src.count("rt.moe(") == 1 and f"{act} =" in src.replace("    ", "")
