"""A `tokenizers` pipeline rebuilt from a GGUF file's tokenizer.ggml.* metadata. Torch-free.

    tokenizer.ggml.model        "gpt2": byte-level BPE (the only kind built here; "llama" SentencePiece
                                and others are refused with their name)
    tokenizer.ggml.pre          how text is split before BPE (llama.cpp's name for the regex; table below)
    tokenizer.ggml.tokens       the vocabulary, in id order (byte-level strings: "Ġthe")
    tokenizer.ggml.merges       "a b" merge rules, by priority
    tokenizer.ggml.token_type   1 normal, 3 control (special), 4 user-defined (added), ...
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token
                                (generation also ends at eot/eom ids and, as in llama.cpp, at control
                                tokens named like an end of turn: END_OF_GENERATION)
    tokenizer.chat_template     the Jinja chat template

The split regexes are llama.cpp's (llama-vocab.cpp), so a GGUF tokenizes here as llama.cpp tokenizes
it; e.g. "smollm" splits digits one by one before the GPT-2 pattern, as SmolLM2's own tokenizer.json does.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from engine.checkpoint import CheckpointError
from engine.gguf_file import GGUFFile

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> (regex split before byte-level, or None for GPT-2's own; digits one by one first)
_PRE: dict[str, tuple[str | None, bool]] = {
    "gpt2": (None, False), "gpt-2": (None, False),
    "smollm": (None, True), "starcoder": (None, True), "refact": (None, True), "codeshell": (None, True),
    "llama-bpe": (_LLAMA3, False), "llama3": (_LLAMA3, False), "llama-v3": (_LLAMA3, False),
    "smaug-bpe": (_LLAMA3, False), "falcon3": (_LLAMA3, False),
    "qwen2": (_QWEN2, False), "deepseek-r1-qwen": (_QWEN2, False),
}
# Control tokens that end generation whatever eos_token_id says (llama.cpp's end-of-generation texts).
END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
                     "<|end_of_text|>", "<end_of_utterance>")
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}


@dataclass(frozen=True)
class GGUFTokenizer:
    """What `engine.tokenizer.Tokenizer` is built from."""

    backend: Backend
    special_tokens: dict[str, str | None]
    eos_token_ids: frozenset[int]
    chat_template: str | None


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    split, digits = _PRE[pre]
    steps: list[pre_tokenizers.PreTokenizer] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def build_tokenizer(f: GGUFFile) -> GGUFTokenizer:
    """The file's tokenizer. Raises CheckpointError for a tokenizer model or pre-tokenizer not built here."""
    meta = f.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{f.path}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE, "
                              "'gpt2', is)")
    pre = str(meta.get("tokenizer.ggml.pre", "default"))  # llama.cpp's "default" split is not built here
    if pre not in _PRE:
        raise CheckpointError(f"{f.path}: GGUF pre-tokenizer {pre!r} is not supported "
                              f"(supported: {', '.join(sorted(_PRE))})")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise CheckpointError(f"{f.path}: no tokenizer.ggml.tokens in the GGUF metadata")
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre.startswith("qwen2") or pre == "deepseek-r1-qwen":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=ty == _CONTROL, normalized=False)
             for t, ty in zip(tokens, types, strict=True) if ty in (_CONTROL, _USER_DEFINED)]
    backend.add_special_tokens([a for a in added if a.special])
    backend.add_tokens([a for a in added if not a.special])

    specials: dict[str, str | None] = {}
    for name, key in SPECIAL_IDS.items():
        i = meta.get(f"tokenizer.ggml.{key}")
        specials[name] = tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
    bos, eos = specials["bos_token"], specials["eos_token"]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
        pair = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else []),
                         *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
        used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in dict.fromkeys(used)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    eos_ids = {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                      "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)}
    eos_ids |= {i for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
                if ty == _CONTROL and t in END_OF_GENERATION}
    template = meta.get("tokenizer.chat_template")
    return GGUFTokenizer(backend, specials, frozenset(eos_ids), template if isinstance(template, str) else None)
