"""Named quantization configs: which IR passes run (weights, activations, KV cache, key rotation) and which
calibrated weight transforms `einfuse.quant.calibrate` applies first (smoothing, rotation, GPTQ)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..passes.quantize import QuantizeActivations, QuantizeKV, QuantizeWeights, RotateInputs, RotateKeys, check_group


@dataclass(frozen=True)
class Scheme:
    """weights: None | "w4" (progressive, for A8) | "w4a16" (asymmetric u4, f16 scale/zero) | "w8" | "fp8";
    acts: None | "int8" | "fp8" (per token, dynamic); kv: None | 4 | 8 (per token and head);
    rotate_keys: a Hadamard rotation of queries and keys over the head dim before the KV quantization;
    center_keys (needs rotate_keys): the rotated keys centred by their calibrated per-(layer, KV head, channel)
    mean and smoothed by lambda = std^center_keys (mean 1; queries times lambda: the scores keep their softmax),
    None to leave them; key_group: keys quantized per token in groups of this many channels (else per head).
    Calibrated transforms: smooth (SmoothQuant's alpha folded into the preceding norm / projection, or
    None), smooth_attention (QServe's alpha on keys -> queries, or None), gptq (else round to nearest),
    rotate (the residual stream rotated, QuaRot), clip (W4: each group's integer scale and zero searched for
    the least squared error, which may clip its extremes); head: the LM head quantized like the other Linears
    (untied from the embedding first) — at decode it is a fifth of a small model's bytes; rotate_inputs: each
    quantized Linear's input dimension rotated by a block Hadamard matrix (blocks of up to 128), the weight
    W Hb quantized (GPTQ on Hb^T H Hb) and the activation rotated online (QuaRot's online Hadamard, QuIP#'s
    incoherence processing, per Linear: any architecture, e.g. a post-LN BERT the residual rotation skips)."""

    name: str
    weights: str | None = None
    acts: str | None = None
    kv: int | None = None
    group: int = 128
    rotate_keys: bool = False
    center_keys: float | None = None  # the smoothing alpha of the centred keys (0: centred only)
    key_group: int | None = None  # keys' KV-quantization group along the head dim (None: the head dim)
    smooth: float | None = None
    smooth_attention: float | None = None
    gptq: bool = False
    rotate: bool = False  # rotate the residual stream (QuaRot) before quantizing
    clip: bool = False  # W4 (progressive): search each group's scale and zero for the least error (clipping)
    head: bool = False  # quantize the LM head too
    rotate_inputs: bool = False  # each quantized Linear's K rotated by a block Hadamard (weights and activations)

    @property
    def skip(self) -> tuple:
        """Linear names quantize_weights leaves in float."""
        return () if self.head else ("lm_head",)

    def __post_init__(self):
        if self.weights in ("w4", "w4a16"):
            check_group(self.group)
        if self.center_keys is not None:
            if not self.rotate_keys:
                raise ValueError(f"einfuse.quant: scheme {self.name!r}: center_keys needs rotate_keys=True (the "
                                 "keys are centred in the rotated basis)")
            if self.smooth_attention:
                raise ValueError(f"einfuse.quant: scheme {self.name!r}: center_keys and smooth_attention both "
                                 "rescale the keys; use one")
        if self.key_group is not None:
            check_group(self.key_group)
        if self.rotate_inputs and not self.weights:
            raise ValueError(f"einfuse.quant: scheme {self.name!r}: rotate_inputs rotates the quantized Linears' "
                             "inputs; it needs weights= (e.g. 'w4')")

    def with_(self, **kw) -> Scheme:
        return replace(self, **kw)

    @property
    def calibrated(self) -> bool:
        return bool(self.smooth or self.smooth_attention or self.gptq
                    or self.center_keys is not None)  # needs statistics

    def weight_passes(self) -> list:
        """The passes over the whole captured module: keys rotated, weights, activations."""
        out = [RotateKeys(center=self.center_keys is not None)] if self.rotate_keys else []
        if self.rotate_inputs:
            out.append(RotateInputs(skip=self.skip))
        if self.weights == "w4":
            out.append(QuantizeWeights(bits=4, group=self.group, progressive=True, skip=self.skip))
        elif self.weights == "w4a16":
            out.append(QuantizeWeights(bits=4, group=self.group, progressive=False, skip=self.skip))
        elif self.weights == "w8":
            out.append(QuantizeWeights(bits=8, skip=self.skip))
        elif self.weights == "fp8":
            out.append(QuantizeWeights(fmt="fp8", skip=self.skip))
        if self.acts == "int8":
            out.append(QuantizeActivations(bits=8))
        elif self.acts == "fp8":
            out.append(QuantizeActivations(fmt="fp8"))
        return out

    def kv_passes(self) -> list:
        return [QuantizeKV(self.kv, key_group=self.key_group)] if self.kv else []

    def passes(self) -> list:
        """Everything, for a whole-sequence program (einfuse.compile's prepare=)."""
        return self.weight_passes() + self.kv_passes()


_RECIPE = {"rotate": True, "gptq": True}
_W4 = {**_RECIPE, "clip": True}
# keys rotated, centred and smoothed (alpha 0.5), in groups of 32 channels: 76 bytes per token and KV head
# of 64 channels (K 32 + 2 x 4, V 32 + 4) against 256 in fp16
_KEYS = {"rotate_keys": True, "center_keys": 0.5, "key_group": 32}
SCHEMES = {
    # the recipes einfuse recommends: the residual stream rotated (QuaRot), GPTQ, keys rotated before 4-bit KV
    "w4a8kv4": Scheme("w4a8kv4", "w4", "int8", 4, **_KEYS, **_W4),
    "w8a8": Scheme("w8a8", "w8", "int8", smooth=0.5),
    "w4a16": Scheme("w4a16", "w4a16", **_RECIPE),
    "w4a8": Scheme("w4a8", "w4", "int8", **_W4),
    # every quantized Linear's input rotated by a block Hadamard (any architecture: MiniLM's post-LN BERT)
    "w4a8-had": Scheme("w4a8-had", "w4", "int8", rotate_inputs=True, **_W4),
    "w8a8-had": Scheme("w8a8-had", "w8", "int8", rotate_inputs=True),
    "w4a8kv4-head": Scheme("w4a8kv4-head", "w4", "int8", 4, head=True, **_KEYS, **_W4),
    "w4a8kv4-noclip": Scheme("w4a8kv4-noclip", "w4", "int8", 4, **_KEYS, **_RECIPE),
    "kv4": Scheme("kv4", kv=4, **_KEYS),
    # QServe's own recipe (SmoothQuant + SmoothAttention + GPTQ) and single-step ablations
    "w4a8kv4-qserve": Scheme("w4a8kv4-qserve", "w4", "int8", 4, smooth=0.5, smooth_attention=0.5, gptq=True),
    "w4a16-gptq": Scheme("w4a16-gptq", "w4a16", gptq=True),
    "w4a16-rot": Scheme("w4a16-rot", "w4a16", rotate=True),
    "w8a8-rot": Scheme("w8a8-rot", "w8", "int8", rotate=True),
    "kv4-rot": Scheme("kv4-rot", kv=4, rotate_keys=True),  # keys rotated only, per head (the ablation)
    "w4a8kv4-rot": Scheme("w4a8kv4-rot", "w4", "int8", 4, rotate_keys=True, **_W4),
    "kv4-smoothattn": Scheme("kv4-smoothattn", kv=4, smooth_attention=0.5),
    "kv8": Scheme("kv8", kv=8),
    "fp8": Scheme("fp8", "fp8", "fp8"),
    # round to nearest, nothing calibrated (the baselines)
    "w4a8kv4-rtn": Scheme("w4a8kv4-rtn", "w4", "int8", 4),
    "w4a8kv4-head-rtn": Scheme("w4a8kv4-head-rtn", "w4", "int8", 4, head=True),
    "w8a8-rtn": Scheme("w8a8-rtn", "w8", "int8"),
    "w4a16-rtn": Scheme("w4a16-rtn", "w4a16"),
    "w4a8-rtn": Scheme("w4a8-rtn", "w4", "int8"),
    "kv4-rtn": Scheme("kv4-rtn", kv=4),
}


def get_scheme(scheme, group: int | None = None) -> Scheme:
    """A Scheme by name (or the Scheme itself), with its group size replaced by `group` when given."""
    if isinstance(scheme, Scheme):
        out = scheme
    elif scheme in SCHEMES:
        out = SCHEMES[scheme]
    else:
        raise ValueError(f"einfuse.quant: no scheme {scheme!r}; the schemes are {', '.join(SCHEMES)} "
                         "(or pass an einfuse.quant.Scheme)")
    return out.with_(group=check_group(group)) if group is not None else out
