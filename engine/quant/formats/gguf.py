"""llama.cpp's GGUF block formats kept quantized: one tensor's raw bytes -> a :class:`GroupWeight`.

``convert_tensor(raw, ggml_type, shape)`` converts one tensor; reading the file and naming tensors belong
to engine/gguf_file.py and engine/weights.py. :func:`detect` picks a file's projection weights that stay
quantized and gives the loader (engine/quant/loader.py) a :class:`GGUFQuant`, which converts them and
undoes llama.cpp's q/k row permutation (rows are independent in every format here, so permuting the rows
of ``qweight``, ``scales`` and ``zeros`` is exact; see :func:`permute_rows`). The reference is the
``gguf`` library's own ``gguf.quants.dequantize``.

Each row of W (N, K) is K / block blocks, little-endian (QK_K = 256)::

    Q4_0  32 values, 18 B: d f16 | qs[16]            v[j] = qs[j] & 15, v[j+16] = qs[j] >> 4;  w = (v - 8) d
    Q4_1  32 values, 20 B: d f16 | m f16 | qs[16]    same nibbles;                            w = v d + m
    Q8_0  32 values, 34 B: d f16 | qs i8[32]                                                  w = q d
    Q4_K  256 values, 144 B: d f16 | dmin f16 | scales[12] (8 x 6-bit sc, 8 x 6-bit mn) | qs[128]
          sub-block i of 32: w = (d sc_i) v - dmin mn_i; bytes 32c..32c+31 hold sub-blocks 2c (low
          nibbles) and 2c+1 (high nibbles)
    Q6_K  256 values, 210 B: ql[128] | qh[64] | scales i8[16] | d f16
          v = (4 low bits from ql) | (2 high bits from qh) << 4 in [0, 63];  w = (d sc_j) (v - 32), j = i // 16

Mapping (G = the group of one scale):

    type   bits  G   scales        zeros                   bytes per weight here (GGUF)
    Q4_0   4     32  d (f16)       8 (uint8)               0.53   (0.56)
    Q4_1   4     32  d (f16)       m (float32 offset)      0.56   (0.63)
    Q8_0   8     32  d (f16)       128 (uint8; v = q+128)  1.06   (1.06)
    Q4_K   4     32  d sc (f32)    -dmin mn (f32 offset)   0.75   (0.56)
    Q6_K   8     16  d sc (f32)    32 (uint8)              1.31   (0.82)

The products d*sc and dmin*mn are exact in float32 (at most 11 + 8 significant bits), so dequantizing the
result gives the library's floats bit for bit. Q4_K and Q6_K pay in bytes for one scale per 32 (16)
values instead of two-level scales, and Q6_K for a byte per 6-bit value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.gguf_file import GGUFFile, TensorInfo, hf_tensor_name, permuted_heads, unpermute_rows
from kernels.wna16_gemm import GroupWeight, pack_int4

QK_K = 256
# ggml type id -> (name, values per block, bytes per block); gguf.GGMLQuantizationType's ids
TYPES: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34), 12: ("Q4_K", QK_K, 144), 14: ("Q6_K", QK_K, 210),
}


def type_name(ggml_type: int) -> str:
    return TYPES[ggml_type][0] if ggml_type in TYPES else f"ggml type {ggml_type}"


def _f16(b: np.ndarray) -> Tensor:
    """(..., 2) uint8 little-endian half floats -> (...) float32."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32))


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) values: the low nibbles are values 0..15, the high ones 16..31."""
    return np.concatenate((qs & 15, qs >> 4), axis=-1)


def _q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 12) bytes -> 6-bit (sc, mn), each (B, 8) (llama.cpp's get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), axis=-1)
    mn = np.concatenate((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), axis=-1)
    return sc, mn


def convert_tensor(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> GroupWeight:
    """One GGUF tensor's bytes -> the same weight as a GroupWeight (CPU tensors), without rounding.

    raw: the tensor's data as uint8, any shape holding N * K / block * block_bytes bytes (as the gguf
    reader's ``ReaderTensor.data`` or a memory-mapped slice gives it); ggml_type: the tensor's
    ``GGMLQuantizationType`` value; shape: (N, K) = (out_features, in_features), outermost first.
    Raises ValueError for another type, a K that is not a multiple of the block, or a size mismatch.
    """
    if ggml_type not in TYPES:
        raise ValueError(f"{type_name(ggml_type)} is not kept quantized (supported: "
                         f"{', '.join(t[0] for t in TYPES.values())}); dequantize it at load instead")
    name, block, nbytes = TYPES[ggml_type]
    n, k = shape
    if k % block:
        raise ValueError(f"{name}: in_features {k} is not a multiple of its block of {block}")
    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if data.size != n * (k // block) * nbytes:
        raise ValueError(f"{name} tensor of shape {shape} needs {n * (k // block) * nbytes} bytes, got {data.size}")
    b = data.reshape(n, k // block, nbytes)  # (N, blocks per row, bytes per block)
    if name in ("Q4_0", "Q4_1"):
        head = 2 if name == "Q4_0" else 4
        v = _nibbles32(b[..., head:]).reshape(n, k)
        d = _f16(b[..., 0:2]).to(torch.float16)
        if name == "Q4_0":
            zeros = torch.full(d.shape, 8, dtype=torch.uint8)
            return GroupWeight(pack_int4(torch.from_numpy(v)), d, zeros, 32, 4)
        return GroupWeight(pack_int4(torch.from_numpy(v)), d, _f16(b[..., 2:4]), 32, 4)
    if name == "Q8_0":
        q = b[..., 2:].view(np.int8).reshape(n, k).astype(np.int16) + 128
        d = _f16(b[..., 0:2]).to(torch.float16)
        return GroupWeight(torch.from_numpy(q.astype(np.uint8)), d, torch.full(d.shape, 128, dtype=torch.uint8), 32, 8)
    if name == "Q4_K":
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # (N, S) super-blocks
        sc, mn = _q4_k_scales(b[..., 4:16].reshape(-1, 12))
        qs = b[..., 16:].reshape(n, -1, 4, 32)  # (N, S, chunk, 32 bytes): 2 sub-blocks per chunk
        v = np.stack((qs & 15, qs >> 4), axis=3).reshape(n, k)
        scales = d[..., None] * torch.from_numpy(sc.astype(np.float32)).reshape(n, -1, 8)
        offsets = -(dmin[..., None] * torch.from_numpy(mn.astype(np.float32)).reshape(n, -1, 8))
        return GroupWeight(pack_int4(torch.from_numpy(v)), scales.reshape(n, -1), offsets.reshape(n, -1), 32, 4)
    # Q6_K: two halves of 128 values; in each, ql[64] and qh[32] give 4 runs of 32 values.
    shifted_l = b[..., :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    ql = (shifted_l & 15).reshape(n, -1, 2, 4, 32)
    shifted_h = b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    qh = (shifted_h & 3).reshape(n, -1, 2, 4, 32)
    v = (ql | (qh << 4)).astype(np.uint8).reshape(n, k)
    sc = b[..., 192:208].view(np.int8).reshape(n, -1, 16).astype(np.float32)
    scales = _f16(b[..., 208:210])[..., None] * torch.from_numpy(sc)
    return GroupWeight(torch.from_numpy(np.ascontiguousarray(v)), scales.reshape(n, -1),
                       torch.full((n, k // 16), 32, dtype=torch.uint8), 16, 8)  # fmt: skip


def permute_rows(w: GroupWeight, index: Tensor) -> GroupWeight:
    """``w`` with its rows reordered: row i of the result is row ``index[i]`` of ``w`` (exact: every
    format here quantizes rows independently). For llama.cpp's q/k rotary permutation."""
    return w._replace(qweight=w.qweight[index], scales=w.scales[index], zeros=w.zeros[index])


# the decoder layers' projections, which Tandem keeps quantized (embeddings, norms and lm_head stay float)
_PROJECTION_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight")


@dataclass(frozen=True)
class GGUFQuant:
    """A GGUF file's projection weights kept quantized: the loader's view of it (the interface of
    engine/quant/prequantized.py ``CheckpointQuant``). ``kept`` maps each kept weight's Hugging Face
    name to its place in the file; every other tensor is dequantized to float as it is read."""

    file: GGUFFile
    kept: dict[str, TensorInfo]
    method: str = "gguf"

    def keep(self, name: str, ggml_type: int) -> bool:
        """Whether the stream (engine.weights.iter_gguf ``raw=``) yields this tensor's raw blocks."""
        return name in self.kept and self.kept[name].type == ggml_type

    def is_member(self, suffix: str) -> bool:
        return False  # a GGUF module is one ``weight`` (and maybe a ``bias``), no side tensors

    def convert(self, module: str, tensors: dict[str, Tensor]) -> GroupWeight | Tensor:
        """One projection's tensors -> its GroupWeight (rows in Hugging Face order), or its float
        ``weight`` as read when that was not kept quantized. Raises ValueError naming the module."""
        w = tensors["weight"]
        if w.is_floating_point():
            return w
        name = f"{module}.weight"
        info = self.kept[name]
        n, k = info.shape
        try:
            q = convert_tensor(w.numpy(), info.type, (n, k))
        except ValueError as exc:
            raise ValueError(f"{module}: cannot keep GGUF tensor {info.name} quantized: {exc}") from exc
        heads = permuted_heads(self.file, name)
        if heads is not None:
            q = permute_rows(q, torch.from_numpy(unpermute_rows(np.arange(n), heads)))
        return q

    def summary(self) -> str:
        """"210 x Q4_1" for the log."""
        counts: dict[str, int] = {}
        for info in self.kept.values():
            counts[type_name(info.type)] = counts.get(type_name(info.type), 0) + 1
        return ", ".join(f"{c} x {name}" for name, c in sorted(counts.items()))


def detect(f: GGUFFile) -> GGUFQuant | None:
    """The projection weights of ``f`` that load kept quantized: those of a type in :data:`TYPES` whose
    in_features is a multiple of the type's block. None when there are none (an F32/F16 file, or one
    whose projections are all of other types, which load dequantized)."""
    kept = {}
    for info in f.tensors.values():
        name = hf_tensor_name(info.name)
        if name is None or not _PROJECTION_WEIGHT.fullmatch(name) or info.type not in TYPES or len(info.shape) != 2:
            continue
        if info.shape[1] % TYPES[info.type][1] == 0:
            kept[name] = info
    return GGUFQuant(f, kept) if kept else None
