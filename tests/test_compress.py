"""Sub-1-bit experts (QMoE): the dictionary codec, ternary GPTQ, the fused decode-and-multiply kernel,
checkpoints with checksums, and the compress_experts driver on a tiny Mixtral."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
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

QMOE = (0.885, 0.0575, 0.0575)


def _stream(rows, cols, zero, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([zero, (1 - zero) / 2, (1 - zero) / 2])
    return torch.multinomial(p, rows * cols, replacement=True, generator=g).view(rows, cols).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ codec

@settings(max_examples=25, deadline=None)
@given(zero=st.floats(0.3, 0.95), streams=st.integers(1, 9), cols=st.integers(1, 300), bits=st.sampled_from([2, 6, 8, 11, 16]),
       mismatched=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_decode_encode_is_identity(zero, streams, cols, bits, mismatched, seed):
    s = _stream(streams, cols, zero, seed)
    lengths = torch.randint(0, cols + 1, (streams,), generator=torch.Generator().manual_seed(seed))
    probs = (0.5, 0.25, 0.25) if mismatched else symbol_probs(s)  # exact whatever the dictionary was built for
    d = build_dictionary(probs, bits)
    enc = encode(s, d, lengths)
    assert enc.codes.numel() == int(enc.counts.sum())
    want = torch.cat([s[i, :int(n)] for i, n in enumerate(lengths)])
    assert torch.equal(decode(enc, d, lengths), want)
    assert torch.equal(unpack(pack(enc.codes, bits), bits, enc.codes.numel()), enc.codes)


@settings(max_examples=12, deadline=None)
@given(zero=st.floats(0.3, 0.95), E=st.integers(1, 3), N=st.integers(1, 40), K=st.integers(1, 130),
       bits=st.sampled_from([6, 12, 16]), seed=st.integers(0, 2 ** 16))
def test_compressed_tensor_round_trips_groups_whose_runs_cross_rows(zero, E, N, K, bits, seed):
    """Groups of 16 rows coded as one stream (runs cross rows, short rows cross several): every expert's
    symbols come back exactly, alone or with the others, and the row scales are the log grid's."""
    s = _stream(E * N, K, zero, seed).view(E, N, K)
    g = torch.Generator().manual_seed(seed)
    lo, hi = -torch.rand(E, N, generator=g), torch.rand(E, N, generator=g)
    d = build_dictionary(symbol_probs(s), bits)
    ct = CompressedTensor.encode(s, lo, hi, d)
    assert torch.equal(ct.symbols(d), s)
    assert torch.equal(ct.symbols(d, [E - 1, 0]), s[[E - 1, 0]])
    l2, h2 = ct.scale_values()
    big = hi > hi.amax(-1, keepdim=True) / 100  # values far below the base are raised to the grid's floor
    assert torch.all(((h2 - hi).abs() <= 0.045 * hi)[big])
    assert torch.all(l2 <= 0) and torch.all(h2 >= 0)
    ct.verify()


def test_dictionary_is_rebuilt_bit_for_bit_from_its_weights():
    d = build_dictionary(QMOE, 16)
    again = build_dictionary(d.weights, 16)
    assert sum(d.weights) == 2 ** 16 and torch.equal(d.entries, again.entries)
    assert d.size == 2 ** 16 - 1 and int(d.lengths.max()) <= 64 and int(((d.entries >> 7) & 7).max()) <= 7
    assert d.stored_nbytes == 7


def test_chosen_width_on_qmoe_statistics_beats_qmoe_and_is_near_entropy():
    """On a zero-share-0.885 stream the width einfuse chooses codes within 5% of the order-0 entropy and in
    fewer bits than QMoE's scheme (2^16 codewords, runs of at most 14 ternary pairs), which round-trips too."""
    s = _stream(16, 2048, 0.885, 0)
    qmoe = build_dictionary(QMOE, 16, max_len=28)
    assert int(qmoe.lengths.max()) == 28
    enc = encode(s, qmoe)
    assert torch.equal(decode(enc, qmoe, torch.full((16,), 2048)), s.reshape(-1))
    best, table = choose_bits(s, widths=(10, 12, 14, 16))
    h = entropy(symbol_probs(s))
    assert table[best]["bits_per_symbol"] < 1.05 * h
    assert table[best]["bits_per_symbol"] < 0.95 * enc.codes.numel() * 16 / s.numel()


def test_bits_per_parameter_everything_counted_on_qmoe_statistics():
    """<= 0.8 bits per parameter with codes, dictionary, offsets, scales and checksums all counted,
    on expert matrices of Switch-c2048's row length (2048) at QMoE's zero share."""
    E, rows, cols = 4, 256, 2048
    s = _stream(E * rows, cols, 0.885, 1).view(E, rows, cols)
    lo = -torch.rand(E, rows) - 0.1
    hi = torch.rand(E, rows) + 0.1
    d = build_dictionary(symbol_probs(s), 14)
    ct = CompressedTensor.encode(s, lo, hi, d)
    total = sum(ct.nbytes().values()) + d.stored_nbytes
    assert total * 8 / s.numel() <= 0.8, total * 8 / s.numel()
    assert torch.equal(ct.symbols(d), s)


def test_decoder_refuses_inconsistent_streams():
    s = _stream(3, 50, 0.8, 2)
    d = build_dictionary(symbol_probs(s), 8)
    enc = encode(s, d)
    lengths = torch.full((3,), 50)
    with pytest.raises(ValueError, match="einfuse.compress.codec"):
        decode(Encoded(enc.codes[:-1], enc.counts), d, lengths)
    short = Encoded(enc.codes[: int(enc.counts[0]) - 1], torch.tensor([int(enc.counts[0]) - 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="fewer than"):
        decode(short, d, lengths[:1])


# ------------------------------------------------------------------------------------------------ ternary

def test_ternary_grid_values_are_row_min_zero_max():
    W = torch.randn(5, 40, dtype=torch.float64)
    s, lo, hi = ternary_rtn(W)
    deq = dequantize(s, lo, hi)
    for r in range(5):
        assert set(deq[r].tolist()) <= {float(lo[r]), 0.0, float(hi[r])}
        # the row's max on the 6-bit log grid (steps of 2^(1/8) below the matrix's largest magnitude)
        step = -8 * torch.log2(hi[r] / W.abs().max())
        assert abs(float(step) - round(float(step))) < 1e-5 and abs(float(hi[r] / W[r].max()) - 1) <= 0.045
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


@pytest.mark.parametrize("part,match", [("codes", "code stream"), ("bases", "row offsets"),
                                        ("scales", "row scales"), ("sbase", "row scales"),
                                        ("dictionary", "dictionary")])
def test_damaged_checkpoint_is_refused(tmp_path, part, match):
    from safetensors.torch import load_file, save_file
    _checkpoint(tmp_path)
    if part == "dictionary":  # the manifest's dictionary weights: a different dictionary, its CRC fails
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        w = manifest["dictionary"]["weights"]
        w[0], w[1] = w[1], w[0]
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    else:
        path = tmp_path / "experts.safetensors"
        arrays = load_file(str(path))
        t = arrays[f"layers.0.experts.down_proj.{part}"]
        flat = t.view(torch.uint8).view(-1)
        idx = flat.numel() // 2 if part != "scales" else flat.numel() - 6  # the last expert's scales
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
    binds = {"x": x, **{f"mlp_experts_down_proj_{k}": v for k, v in arrays(ct, padded_dictionary(d)).items()}}
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
