"""Sub-1-bit experts (QMoE): the dictionary codec, ternary GPTQ, the fused decode-and-multiply kernel,
checkpoints with checksums, and the compress_experts driver on a tiny Mixtral."""
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import einfuse  # noqa: F401  (selects Triton's interpreter on CPU)
from einfuse.compress.codec import (
    Encoded,
    build_dictionary,
    choose_bits,
    decode,
    encode,
    entropy,
    pack,
    symbol_probs,
    unpack,
)
from einfuse.compress.format import CompressedTensor, CorruptCheckpoint, load, save
from einfuse.compress.ternary import TernaryGrid, dequantize, ternary_gptq, ternary_rtn
from einfuse.kinds.cdot import cdot, reference

QMOE = (0.885, 0.0575, 0.0575)


def _stream(rows, cols, zero, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([zero, (1 - zero) / 2, (1 - zero) / 2])
    return torch.multinomial(p, rows * cols, replacement=True, generator=g).view(rows, cols).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ codec

@settings(max_examples=25, deadline=None)
@given(zero=st.floats(0.3, 0.95), rows=st.integers(1, 9), cols=st.integers(1, 300), bits=st.sampled_from([2, 6, 8, 11]),
       mismatched=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_decode_encode_is_identity(zero, rows, cols, bits, mismatched, seed):
    s = _stream(rows, cols, zero, seed)
    probs = (0.5, 0.25, 0.25) if mismatched else symbol_probs(s)  # exact whatever the dictionary was built for
    d = build_dictionary(probs, bits)
    enc = encode(s, d)
    assert enc.codes.numel() == int(enc.counts.sum())
    assert torch.equal(decode(enc, d, cols), s)
    assert torch.equal(unpack(pack(enc.codes, bits), bits, enc.codes.numel()), enc.codes)


def test_qmoe_scheme_and_chosen_width_on_qmoe_statistics():
    """QMoE's own scheme (2^16 codewords, runs of up to 14 pairs) round-trips; the width einfuse chooses
    codes a zero-share-0.885 stream in fewer bits, and within 10% of the order-0 entropy."""
    s = _stream(16, 2048, 0.885, 0)
    qmoe = build_dictionary(QMOE, 16, max_len=28)
    assert qmoe.size == 2 ** 16 - 1 and int(qmoe.lengths.max()) == 28
    enc = encode(s, qmoe)
    assert torch.equal(decode(enc, qmoe, 2048), s)
    _, table = choose_bits(s, widths=(8, 10, 12), total_symbols=10 ** 9)  # a model large enough to ignore dictionaries
    best = min(table, key=lambda w: table[w]["total_bits"])
    assert best == 10
    h = entropy(symbol_probs(s))
    assert table[best]["bits_per_symbol"] < 1.1 * h
    assert table[best]["bits_per_symbol"] < 0.97 * enc.codes.numel() * 16 / s.numel()  # better than QMoE's


def test_bits_per_parameter_everything_counted_on_qmoe_statistics():
    """<= 0.8 bits per parameter with codes, dictionary, offsets, scales and checksums all counted,
    on expert matrices of Switch-c2048's row length (2048) at QMoE's zero share."""
    E, rows, cols = 4, 256, 2048
    s = _stream(E * rows, cols, 0.885, 1).view(E, rows, cols)
    lo = -torch.rand(E, rows) - 0.1
    hi = torch.rand(E, rows) + 0.1
    best, _ = choose_bits(s, widths=(8, 10), sample_rows=64)
    d = build_dictionary(symbol_probs(s), best)
    ct = CompressedTensor.encode(s, lo, hi, d)
    total = sum(ct.nbytes().values()) + d.nbytes
    assert total * 8 / s.numel() <= 0.8, total * 8 / s.numel()
    assert torch.equal(ct.symbols(d), s)


def test_decoder_refuses_inconsistent_streams():
    s = _stream(3, 50, 0.8, 2)
    d = build_dictionary(symbol_probs(s), 8)
    enc = encode(s, d)
    with pytest.raises(ValueError, match="einfuse.compress.codec"):
        decode(Encoded(enc.codes[:-1], enc.counts), d, 50)
    short = Encoded(enc.codes[: int(enc.counts[0]) - 1], torch.tensor([int(enc.counts[0]) - 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="fewer than"):
        decode(short, d, 50)


# ------------------------------------------------------------------------------------------------ ternary

def test_ternary_grid_values_are_row_min_zero_max():
    W = torch.randn(5, 40, dtype=torch.float64)
    s, lo, hi = ternary_rtn(W)
    deq = dequantize(s, lo, hi)
    for r in range(5):
        assert set(deq[r].tolist()) <= {float(lo[r]), 0.0, float(hi[r])}
        assert float(hi[r]) == float(W[r].max().half())
    assert torch.equal(deq.double(), TernaryGrid().quantize(W, (lo[:, None], hi[:, None]))[0].float().double())


def test_ternary_gptq_beats_rtn_on_layer_output():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 400, 48, generator=g, dtype=torch.float64) @ (torch.eye(48) + 0.3 * torch.randn(48, 48, generator=g)).double()
    W = 0.02 * torch.randn(2, 32, 48, generator=g, dtype=torch.float64)
    H = 2 / 400 * X.transpose(1, 2) @ X
    sg, lg, hg = ternary_gptq(W, H)
    sr, lr, hr = ternary_rtn(W)
    err = lambda s, lo, hi: (X @ (dequantize(s, lo, hi).double() - W).transpose(1, 2)).pow(2).mean()
    assert err(sg, lg, hg) < 0.7 * err(sr, lr, hr)


# ------------------------------------------------------------------------------------------------ kernel

@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(E=st.integers(1, 3), N=st.integers(1, 35), K=st.integers(1, 70), zero=st.floats(0.3, 0.95),
       bits=st.sampled_from([6, 13]), data=st.data())
def test_fused_kernel_equals_dequantize_then_matmul(E, N, K, zero, bits, data):
    seed = data.draw(st.integers(0, 1000))
    s = _stream(E * N, K, zero, seed).view(E, N, K)
    g = torch.Generator().manual_seed(seed)
    lo, hi = -torch.rand(E, N, generator=g), torch.rand(E, N, generator=g)
    d = build_dictionary(symbol_probs(s), bits)
    ct = CompressedTensor.encode(s, lo, hi, d)
    tokens = [data.draw(st.integers(0, 16)) for _ in range(E)]  # 0 tokens: the expert is not active
    experts = torch.tensor([e for e in range(E) if tokens[e]], dtype=torch.int32)
    seg = torch.tensor([0] + [t for t in tokens if t], dtype=torch.int32).cumsum(0).to(torch.int32)
    x = torch.randn(int(seg[-1]), K, generator=g)
    got = cdot(x, ct, d, seg, experts)
    want = reference(x, ct.dequantize(d), seg, experts)
    scale = (x.abs() @ ct.dequantize(d).abs().amax(0).T).clamp(min=1e-6) if x.numel() else 1
    assert torch.all((got - want).abs() <= 1e-5 * scale), (got - want).abs().max()


@pytest.mark.parametrize("rows", [32, 48, 128])
def test_fused_kernel_programs_of_several_row_groups(monkeypatch, rows):
    """ROWS_PER_PROGRAM rows per program, the last program's groups past the matrix skipped: the same result,
    and the dictionary loaded once per program — the only bytes that change with the program count."""
    import einfuse.kinds.cdot as cdot_mod
    from einfuse.runtime.traffic import Traffic, counting
    E, N, K = 3, 70, 40  # 5 groups of 16 rows, the last ragged
    s = _stream(E * N, K, 0.8, 9).view(E, N, K)
    g = torch.Generator().manual_seed(9)
    d = build_dictionary(symbol_probs(s), 6)
    ct = CompressedTensor.encode(s, -torch.rand(E, N, generator=g), torch.rand(E, N, generator=g), d)
    seg, experts = torch.tensor([0, 3, 4], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    x = torch.randn(4, K, generator=g)
    loaded = {}
    for r in (16, rows):
        monkeypatch.setattr(cdot_mod, "ROWS_PER_PROGRAM", r)
        assert cdot_mod.rows_per_program(2, 5) == r
        t = Traffic()
        with counting(t):
            got = cdot(x, ct, d, seg, experts)
        assert torch.allclose(got, reference(x, ct.dequantize(d), seg, experts), rtol=1e-5, atol=1e-5)
        loaded[r] = t.bytes_loaded
    programs = lambda r: 2 * -(-5 // (r // 16))  # noqa: E731
    # per program: the dictionary (64 entries of a length byte and two 32-bit masks) and its expert's id and
    # token range (three int32)
    assert loaded[16] - loaded[rows] == (programs(16) - programs(rows)) * (64 * (1 + 4 + 4) + 3 * 4)


def test_rows_per_program_keeps_the_gpu_busy():
    from einfuse.kinds.cdot import rows_per_program
    assert rows_per_program(2, 64) == 16  # a small decode step: 128 programs of 16 rows
    assert rows_per_program(2, 1792) == 128  # Mixtral-sized experts: 8 groups per program, 448 programs
    assert rows_per_program(8, 200) == 64


# ------------------------------------------------------------------------------------------------ checkpoints

def _checkpoint(tmp_path):
    s = _stream(3 * 20, 64, 0.85, 3).view(3, 20, 64)
    lo, hi = -torch.rand(3, 20), torch.rand(3, 20)
    d = build_dictionary(symbol_probs(s), 8)
    ct = CompressedTensor.encode(s, lo, hi, d)
    save(str(tmp_path), {"layers.0.experts.down_proj": ct}, d, {"note": "test"})
    return ct, d


def test_checkpoint_round_trip_is_safetensors_and_json(tmp_path):
    ct, d = _checkpoint(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["experts.safetensors", "manifest.json"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tensors"]["layers.0.experts.down_proj"]["shape"] == [3, 20, 64]
    tensors, d2, _ = load(str(tmp_path))
    assert torch.equal(tensors["layers.0.experts.down_proj"].dequantize(d2), ct.dequantize(d))


@pytest.mark.parametrize("part,match", [("codes", "code stream"), ("counts", "row offsets"),
                                        ("bases", "row offsets"), ("scales", "row scales"),
                                        ("dictionary.nz", "dictionary")])
def test_damaged_checkpoint_is_refused(tmp_path, part, match):
    from safetensors.torch import load_file, save_file
    _checkpoint(tmp_path)
    path = tmp_path / "experts.safetensors"
    arrays = load_file(str(path))
    key = part if part.startswith("dictionary") else f"layers.0.experts.down_proj.{part}"
    t = arrays[key]
    flat = t.view(torch.uint8).view(-1)
    idx = flat.numel() // 2 if part != "scales" else flat.numel() - 2  # the last expert's scales
    flat[idx] ^= 0x10
    save_file(arrays, str(path))
    with pytest.raises(CorruptCheckpoint, match=match):
        load(str(tmp_path))


# ------------------------------------------------------------------------------------------------ driver

def _tiny_mixtral(layers=2, hidden=32, inter=24, experts=4, seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=experts,
                        num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def _never_route_to(model, expert):
    """Forward hooks on every router so that `expert` is never in the top-k."""
    def hook(mod, args, out):
        logits = out[0].clone()
        logits[..., expert] = float("-inf")
        probs = torch.softmax(logits.float(), -1)
        val, idx = torch.topk(probs, mod.top_k, -1)
        val = val / val.sum(-1, keepdim=True)
        return out[0], val.to(out[1].dtype), idx
    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


def test_compress_moe_gptq_reports_idle_and_scarce_experts():
    from einfuse.compress.experts import compress_moe
    model = _tiny_mixtral()
    calib = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))]
    x = torch.randint(0, 64, (1, 8))
    ref = model(x).logits
    hooks = _never_route_to(model, 3)
    cm = compress_moe(model, calib, method="gptq", min_tokens=20, progress=False, widths=(6, 8))
    for h in hooks:
        h.remove()
    s = cm.summary()
    idle = [(r.layer, r.tensor) for r in cm.experts if r.expert == 3]
    assert sorted(s["no_tokens"]) == sorted((l, t, 3) for l, t in idle) and len(idle) == 4
    assert all(r.method == "rtn (no tokens)" for r in cm.experts if r.expert == 3)
    assert all(r.tokens > 0 for r in cm.experts if r.expert != 3)
    assert {r.method for r in cm.experts if r.expert != 3} <= {"gptq", "gptq+damp (few tokens)"}
    # the model now evaluates with the ternary weights, decoded from the stored streams
    for name, ct in cm.tensors.items():
        assert torch.equal(model.get_submodule(name.rpartition(".")[0]).get_parameter(name.rpartition(".")[2]),
                           ct.dequantize(cm.dictionary))
    out = model(x).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    assert s["bits_per_param"] > s["code_bits_per_param"] > 0


def test_no_moe_layers_is_refused():
    from einfuse.compress.experts import NoMoELayers, compress_moe
    dense = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(NoMoELayers, match="has no MoE layers.*2 nn.Linear"):
        compress_moe(dense, None, method="rtn")


def test_compressed_experts_module_runs_the_fused_kernel():
    from einfuse.compress.experts import CompressedExperts, compress_moe, install
    model = _tiny_mixtral(layers=1, hidden=32, inter=16)
    cm = compress_moe(model, None, method="rtn", progress=False, widths=(6,))
    x = torch.randint(0, 64, (1, 3))
    want = model(x).logits
    install(model, cm)
    assert isinstance(model.model.layers[0].mlp.experts, CompressedExperts)
    got = model(x).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


# ------------------------------------------------------------------------------------------------ IR pass

MOE_IR = """
module experts
  param mlp_experts_down_proj: f32[3, 20, 64]
  in x: f32[5, 64]
  y[e, t, n]: f32[3, 5, 20] = sum[k:64] x[t, k] * mlp_experts_down_proj[e, n, k]
  out y
"""


def test_compress_experts_pass_encodes_the_weight_and_the_evaluator_decodes_it():
    from einfuse.compress.experts import CompressedModel
    from einfuse.ir import parse, print_module
    from einfuse.ir.evaluator import evaluate
    from einfuse.ir.verify import verify
    from einfuse.kinds.cdot import padded_dictionary
    from einfuse.passes.base import PassError
    from einfuse.passes.compress import CompressExperts, arrays
    s = _stream(60, 64, 0.85, 4).view(3, 20, 64)
    lo, hi = -torch.rand(3, 20), torch.rand(3, 20)
    d = build_dictionary(symbol_probs(s), 8)
    ct = CompressedTensor.encode(s, lo, hi, d)
    cm = CompressedModel({"mlp.experts.down_proj": ct}, d)
    m = parse(MOE_IR)
    out = CompressExperts(cm).run(m)
    text = print_module(out)
    assert f"param mlp_experts_down_proj_codes: tdict8[{ct.codes.numel()}]" in text
    assert "bits_per_param=" in text and "decode_experts" in text
    assert parse(text) == out  # the encoded type prints and parses back
    verify(out)
    x = torch.randn(5, 64)
    binds = {"x": x, **{f"mlp_experts_down_proj_{k}": v for k, v in arrays(ct, padded_dictionary(d)[:3]).items()}}
    got = evaluate(out, binds)["y"]
    want = torch.einsum("tk,enk->etn", x, ct.dequantize(d))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    # a damaged stream is refused by the evaluator's decode, never decoded into wrong weights
    bad = dict(binds)
    bad["mlp_experts_down_proj_codes"] = ct.codes.clone()
    bad["mlp_experts_down_proj_codes"][3] ^= 1
    with pytest.raises(Exception, match="code stream checksum"):
        evaluate(out, bad)
    dense = parse(MOE_IR.replace("mlp_experts_down_proj", "w").replace("[3, 20, 64]", "[20, 64]")
                  .replace("[e, n, k]", "[n, k]").replace("y[e, t, n]: f32[3, 5, 20]", "y[t, n]: f32[5, 20]"))
    with pytest.raises(PassError, match="no MoE expert weight inputs"):
        CompressExperts(cm).run(dense)


@pytest.mark.slow
def test_fused_kernel_compiles_for_sm80_sm90a_without_spills(tmp_path):
    """The decode-and-multiply kernel at 1 and 16 tokens per expert (a 2^10 dictionary held in registers /
    shared memory via tl.gather; int16 row counts) for A100 and H100: no errors, no spills."""
    from einfuse.codegen.aot import check_gpu
    from einfuse.kinds.cdot import spec
    s = _stream(2 * 16, 600, 0.85, 5).view(2, 16, 600)
    d = build_dictionary(symbol_probs(s), 10)
    ct = CompressedTensor.encode(s, -torch.rand(2, 16), torch.rand(2, 16), d)
    specs = [spec(ct, d, bt, name=f"cdot_t{bt}") for bt in (1, 16)]
    assert specs[1].constexprs["DICT_IN_REGS"] and specs[1].mapping.num_warps == 8
    checks = check_gpu(specs, cache_dir=str(tmp_path), progress=False)
    assert len(checks) == 4
    for c in checks:
        assert c.ok and c.spills == 0 and c.registers <= 255, c


@pytest.mark.slow
def test_compress_experts_through_einfuse_compile(tmp_path):
    """prepare=[compress_experts(...)] on a captured Mixtral: the dumps carry the tdict code streams and the
    decode; the compiled model (torch backend) equals the model with its experts replaced by the ternary
    weights; the derived inputs bind to the buffers compress_experts registered."""
    from einfuse.passes.compress import compress_experts
    model = _tiny_mixtral(layers=1)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    p = compress_experts(model=model, calibration=[torch.randint(0, 64, (2, 16))], widths=(6,), progress=False)
    want = model(ids, use_cache=False).logits
    fn = einfuse.compile(model, (ids,), kwargs={"use_cache": False}, prepare=[p], backend="torch",
                         dump_dir=str(tmp_path))
    got = fn(ids, use_cache=False).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    text = (tmp_path / "00_lower.ir").read_text()
    assert "mlp_experts_gate_up_proj_codes: tdict6[" in text and "decode_experts" in text
    assert "bits_per_param=" in text


def test_compressed_moe_generates_through_the_inference_runtime():
    """compress_experts as a prepare pass of the paged runner: einfuse.LLM's prefill and decode programs read
    the dictionary-coded experts (the routed MoE step computes with the stored codes) and greedy generation of three prompts of different
    lengths gives exactly the tokens of the model whose experts compress_moe replaced by their ternary values."""
    from einfuse.models import tiny_decoder
    from einfuse.passes.compress import compress_experts
    from einfuse.serve import LLM
    from einfuse.serve.paged import PagedRunner

    model = tiny_decoder("mixtral", num_hidden_layers=2)
    calib = [torch.randint(1, 256, (1, 32), generator=torch.Generator().manual_seed(k)) for k in range(4)]
    p = compress_experts(calibration=calib, model=model)
    prompts = [[int(x) for x in torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (5, 9, 3)]
    want = LLM(model, backend="eager").generate(prompts, max_new_tokens=8, ignore_eos=True)
    llm = LLM(model, runner=PagedRunner(model, "torch", prepare=[p]), backend="torch")
    assert llm.generate(prompts, max_new_tokens=8, ignore_eos=True) == want
    for program in (llm.runner.programs.prefill, llm.runner.programs.decode):
        assert any(i.type.dtype.name.startswith("tdict") for i in program.ir.inputs)  # the coded stream is bound
    # the decode step: each layer's experts run routed on the stored codes, the dense decode is not in the program
    decode = llm.runner.programs.decode.run
    assert [how.split(":")[0] for _, how in decode.moe_chains] == ["routed, compressed experts"] * 2
    assert "decode_experts" not in decode.source


# ------------------------------------------------------------------------------------------------ compiled, routed

def _compiled_compressed(experts=8, layers=1):
    """A tiny Mixtral with its experts compressed (round-to-nearest; the model now holds the dequantized
    ternary weights: the dequantize-then-eager reference) and its torch-backend compile."""
    from einfuse.passes.compress import compress_experts
    model = _tiny_mixtral(layers=layers, experts=experts)
    p = compress_experts(model=model, calibration=None, widths=(6,), progress=False)
    ids = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(5))
    return model, einfuse.compile(model, (ids,), kwargs={"use_cache": False}, prepare=[p], backend="torch")


def _count_calls(monkeypatch, owner, name):
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("path", ["kernel", "decode"])
def test_compiled_compressed_moe_computes_on_the_stored_codes(monkeypatch, path):
    """The compiled program's MoE chain runs routed on the dictionary-coded experts: through the fused cdot
    kernel (Triton's interpreter here) or, the CPU default, by decoding the activated experts alone. The
    logits equal the dequantize-then-eager model within f32 rounding at 1 token (a decode step) and at 3
    tokens (8 experts, top-2: at least two receive no token), and the dense decode_experts never runs."""
    import einfuse.compress.ir
    import einfuse.kinds.cdot
    from einfuse.compress.format import CompressedTensor
    model, fn = _compiled_compressed()
    monkeypatch.setenv("EINFUSE_COMPRESSED_EXPERTS", path)

    def no_dense_decode(*a, **k):
        raise AssertionError("the dense decode_experts ran in the routed path")
    monkeypatch.setattr(einfuse.compress.ir, "decode_experts", no_dense_decode)
    kernel_calls = _count_calls(monkeypatch, einfuse.kinds.cdot, "cdot")
    decoded = _count_calls(monkeypatch, CompressedTensor, "dequantize_experts")
    for T in (1, 3):
        kernel_calls.clear()
        decoded.clear()
        ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(10 + T))
        want = model(ids, use_cache=False).logits
        got = fn(ids, use_cache=False).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
        run = fn.variant.run
        assert "decode_experts" not in run.source and "rt.moe_compressed(" in run.source
        assert [how.startswith("routed, compressed experts") for _, how in run.moe_chains] == [True]
        if path == "kernel":
            assert len(kernel_calls) == 2 and not decoded  # gate/up and down, one launch each
            active = kernel_calls[0][4]
        else:
            assert len(decoded) == 2 and not kernel_calls
            active = decoded[0][2]
        assert 0 < active.numel() <= 2 * T < 8  # only the activated experts are read
    assert "routed, compressed experts: the fused decode-and-multiply kernel" in fn.explain(print_it=False).text


def test_triton_backend_runs_compressed_experts_through_the_fused_kernel(monkeypatch):
    """backend="triton": the compressed chain's MoE kernels and dense decodes are replaced by one routed
    step on the stored codes through the cdot kernel (Triton's interpreter here); explain() says so."""
    import einfuse.compress.ir
    import einfuse.kinds.cdot
    from einfuse.passes.compress import compress_experts
    model = _tiny_mixtral(layers=1, experts=4)
    p = compress_experts(model=model, calibration=None, widths=(6,), progress=False)
    ids = torch.randint(0, 64, (1, 2), generator=torch.Generator().manual_seed(3))
    fn = einfuse.compile(model, (ids,), kwargs={"use_cache": False}, prepare=[p], backend="triton")

    def no_dense_decode(*a, **k):
        raise AssertionError("the dense decode_experts ran")
    monkeypatch.setattr(einfuse.compress.ir, "decode_experts", no_dense_decode)
    calls = _count_calls(monkeypatch, einfuse.kinds.cdot, "cdot")
    want = model(ids, use_cache=False).logits
    got = fn(ids, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert len(calls) == 2
    (note,) = fn.variant.run.notes
    assert note.startswith("MoE experts moe_moe_out: routed, compressed experts")
    assert note in fn.explain(print_it=False).text
    # CUDA graphs cannot capture the routed step's data-dependent sorting: they are turned off, and said so
    from einfuse.runtime.triton_backend import TritonRunner
    run = fn.variant.run
    graphed = TritonRunner(run.module, run.specs, run.directory, True, cuda_graphs=True)
    assert graphed.graph is None and graphed.notes[-1].startswith("CUDA graphs off: the routed compressed experts")


def test_compiled_compressed_moe_refuses_a_damaged_stream():
    """The routed path checks the stored checksums (once per array) before computing with them."""
    _, fn = _compiled_compressed(experts=4)
    ids = torch.randint(0, 64, (1, 2))
    fn(ids, use_cache=False)
    name, codes = next((n, b) for n, b in fn._model[0].named_buffers() if n.endswith("gate_up_proj_codes"))
    codes[5] ^= 1  # an in-place write: the arrays are checked again
    with pytest.raises(CorruptCheckpoint, match="code stream checksum"):
        fn(ids, use_cache=False)
