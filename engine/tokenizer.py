"""The tokenizer of a Hugging Face checkpoint, on the `tokenizers` library alone.

`Tokenizer.from_dir(model_dir)` reads (a `.gguf` file instead: its tokenizer.ggml.* metadata and
tokenizer.chat_template, engine.gguf_tokenizer):

    tokenizer.json           the pipeline (normalizer, pre-tokenizer, BPE/Unigram model, decoder)
    tokenizer_config.json    bos/eos/unk/pad tokens, add_bos_token/add_eos_token, added tokens,
                             chat_template (or a chat_template.jinja file beside it)
    generation_config.json   eos_token_id (int or list); config.json's is used when this has none

It follows what `transformers.AutoTokenizer` (version 5) does with the same files: named special
tokens are registered as special added tokens; BOS/EOS framing comes from tokenizer.json's
post-processor alone (transformers drops add_bos_token/add_eos_token when tokenizer.json exists; we
log a warning when they disagree with it); `clean_up_tokenization_spaces` is ignored, as transformers
ignores it for BPE tokenizers.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend
from tokenizers.decoders import DecodeStream

from engine.byte_level import ByteTables, byte_tables
from engine.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"special token must be a string or {{'content': ...}}, got {value!r}")


def _added_token(value: Any, special: bool) -> AddedToken:
    if isinstance(value, dict):
        flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
        flags.setdefault("normalized", False)
        return AddedToken(value["content"], special=bool(value.get("special", special)), **flags)
    return AddedToken(value, special=special, normalized=False)


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


class TooManyTokens(ValueError):
    """A text has more tokens than the caller allows (`Tokenizer.encode(..., max_tokens=)`)."""

    def __init__(self, num_tokens: int, max_tokens: int) -> None:
        super().__init__(f"the text has {num_tokens} tokens; at most {max_tokens} are allowed")
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


def _raise_exception(message: str) -> NoReturn:
    raise ValueError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """The chat template compiled as transformers does: sandboxed, trim_blocks, lstrip_blocks."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one checkpoint. Immutable after construction; safe to share."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, str | None],
        eos_token_ids: frozenset[int],
        chat_template: str | None = None,
    ) -> None:
        """Wrap a configured `tokenizers.Tokenizer` (this object owns it afterwards).

        `special_tokens` maps "bos_token"/"eos_token"/"unk_token"/"pad_token" to their text or None;
        each must already be in `backend`'s vocabulary. Use `from_dir` to read a checkpoint.
        """
        self._backend = backend
        self._specials = dict(special_tokens)
        for name, text in self._specials.items():
            if text is not None and backend.token_to_id(text) is None:
                raise ValueError(f"{name} {text!r} is not in the tokenizer's vocabulary")
        tok_eos = self._token_id("eos_token")
        eos = set(eos_token_ids) | ({tok_eos} if tok_eos is not None else set())
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.bos_token_id: int | None = self._token_id("bos_token")
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        named = {i for i in map(self._token_id, self._specials) if i is not None}
        added = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.all_special_ids: frozenset[int] = frozenset(named | added)
        # What the backend itself drops with skip_special_tokens (it checks its special added tokens).
        self._skipped_specials = frozenset(added)
        self.chat_template = chat_template

    def _token_id(self, name: str) -> int | None:
        text = self._specials.get(name)
        return None if text is None else self._backend.token_to_id(text)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load the tokenizer of a checkpoint directory (see the module docstring for the files read).

        Raises CheckpointError if tokenizer.json is missing or a file is malformed.
        """
        from engine import gguf_file

        if gguf_file.is_gguf(model_dir):
            return cls.from_gguf(model_dir)
        path = Path(model_dir)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(
                f"{path} has no tokenizer.json (only fast, tokenizers-format tokenizers are supported)"
            )
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as exc:  # the Rust library raises plain Exception on a bad file
            raise CheckpointError(f"cannot load {tok_file}: {exc}") from exc
        tok_cfg = _read_json(path / "tokenizer_config.json")

        # Added tokens the config declares but tokenizer.json lacks (rare), then the named specials.
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        declared = tok_cfg.get("added_tokens_decoder") or {}
        for _, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
            if isinstance(entry, dict) and entry.get("content") not in present:
                token = _added_token(entry, special=False)
                (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        specials = {name: _token_content(tok_cfg.get(name)) for name in _NAMED_SPECIALS}
        extra = tok_cfg.get("additional_special_tokens") or tok_cfg.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        for value in [tok_cfg.get(name) for name in _NAMED_SPECIALS] + list(extra):
            if value is not None and _token_content(value) not in present:
                backend.add_special_tokens([_added_token(value, special=True)])

        cls._check_bos_eos_flags(backend, specials, tok_cfg, path)

        gen_cfg = _read_json(path / "generation_config.json")
        eos_source = gen_cfg if "eos_token_id" in gen_cfg else _read_json(path / "config.json")
        return cls(
            backend,
            special_tokens=specials,
            eos_token_ids=frozenset(_ids(eos_source.get("eos_token_id"))),
            chat_template=cls._read_chat_template(path, tok_cfg),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer and chat template of a llama.cpp GGUF file (engine.gguf_tokenizer).

        Raises CheckpointError for a malformed file or a tokenizer kind that is not byte-level BPE.
        """
        from engine.gguf_file import read_gguf
        from engine.gguf_tokenizer import build_tokenizer

        t = build_tokenizer(read_gguf(path))
        return cls(t.backend, special_tokens=t.special_tokens, eos_token_ids=t.eos_token_ids,
                   chat_template=t.chat_template)

    @staticmethod
    def _check_bos_eos_flags(
        backend: _Backend, specials: dict[str, str | None], tok_cfg: dict[str, Any], path: Path
    ) -> None:
        """Warn when add_bos_token/add_eos_token disagree with what tokenizer.json's post-processor does.

        transformers 5 drops both flags whenever tokenizer.json exists, so the post-processor wins here too.
        """
        framed = backend.encode("", add_special_tokens=True).ids
        checks = (("add_bos_token", "bos_token", framed[:1]), ("add_eos_token", "eos_token", framed[-1:]))
        for flag, name, actual in checks:
            text = specials[name]
            if flag not in tok_cfg or text is None:
                continue
            adds = actual == [backend.token_to_id(text)]
            if bool(tok_cfg[flag]) != adds:
                logger.warning(
                    "%s: tokenizer_config.json sets %s=%s but tokenizer.json's post-processor %s %s; "
                    "following tokenizer.json, as transformers does",
                    path, flag, tok_cfg[flag], "adds" if adds else "does not add", text,
                )

    @staticmethod
    def _read_chat_template(path: Path, tok_cfg: dict[str, Any]) -> str | None:
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = by_name.get("default")
        return template if isinstance(template, str) else None

    def encode(self, text: str, add_special_tokens: bool = True, *, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the checkpoint's BOS/EOS framing is added.
        Special tokens written in `text` (e.g. "<|im_end|>") become their single ids.

        With `max_tokens` (for servers, which call this off their event loop): the library releases the
        GIL while it tokenizes, and raises TooManyTokens before the ids become a Python list when there
        are more than `max_tokens` of them."""
        if max_tokens is None:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        [encoding] = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)  # GIL released
        if len(encoding) > max_tokens:
            raise TooManyTokens(len(encoding), max_tokens)
        return encoding.ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Bytes of an incomplete UTF-8 character decode to U+FFFD. Ids >= vocab_size
        (rows a model pads its vocabulary with, e.g. Qwen's 151,936 for 151,665 tokens) decode to no
        text, as the `tokenizers` library skips ids it lacks. Raises ValueError for a negative id."""
        known = [i for i in ids if i < self.vocab_size]
        if known and min(known) < 0:
            raise ValueError(f"token ids must be >= 0, got {min(known)}")
        return self._backend.decode(known, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, context_ids: Sequence[int], skip_special_tokens: bool = True) -> Callable[[int], str | None]:
        """An incremental decoder: each call takes the next id and returns the text it makes final, or
        None while that text would end in an incomplete UTF-8 character (the tokenizers library's
        DecodeStream). `context_ids` (ids already decoded, e.g. the prompt's last few) set leading-space
        rules and are never returned. Every id passed must be < vocab_size (see `is_skipped`)."""
        stream = DecodeStream(ids=list(context_ids), skip_special_tokens=skip_special_tokens)
        return functools.partial(stream.step, self._backend)

    @functools.cached_property
    def byte_tables(self) -> ByteTables | None:
        """Each id's bytes and text, when the decoder is the byte-level one (engine.byte_level): made
        on first use (~4 us per id), then shared; None for any other decoder."""
        return byte_tables(self._backend, self._skipped_specials)

    def skipped_ids(self, skip_special_tokens: bool = True) -> frozenset[int]:
        """The ids below vocab_size that `is_skipped` (its special added tokens, when skipped)."""
        return self._skipped_specials if skip_special_tokens else frozenset()

    def is_skipped(self, token_id: int, skip_special_tokens: bool = True) -> bool:
        """Whether `decode` drops `token_id` before its decoder runs: an id >= vocab_size, or a special
        token when `skip_special_tokens`. Such an id has no effect on any text, in any position:
        decode(ids) == decode([i for i in ids if not is_skipped(i)]) for every kind of tokenizer."""
        return token_id >= self.vocab_size or (skip_special_tokens and token_id in self._skipped_specials)

    def token_id_limit(self, model_vocab_size: int) -> int:
        """One past the largest token id a prompt may hold: max(vocab_size, model_vocab_size), as vLLM
        accepts. A model's vocabulary (its embedding rows) may exceed the tokenizer's (Qwen pads to a
        multiple of 128), and a tokenizer's may exceed the model's (multimodal placeholder tokens)."""
        return max(self.vocab_size, model_vocab_size)

    def to_json(self) -> str:
        """The whole pipeline as tokenizer.json text (what grammar libraries build their view from)."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (not decoded text) of `token_id`, or None if out of range."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._specials.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._specials.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @functools.cached_property
    def _chat_template_compiled(self) -> jinja2.Template:
        assert self.chat_template is not None
        return _compile_template(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, continue_final_message: bool = False,
        **template_vars: Any,
    ) -> str:
        """Render a conversation with the checkpoint's chat template (as transformers renders it).

        `messages` are dicts with at least "role"; `template_vars` (e.g. tools) are passed through.
        `continue_final_message`: the text ends right after the last message's content (no end-of-turn
        tokens), so the model continues that message (a prefilled assistant reply); it excludes
        `add_generation_prompt`. Raises ValueError if the checkpoint has no chat template, `messages` is
        malformed, or the template fails (e.g. its own `raise_exception` for an unsupported role order).
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.chat_template is None:
            raise ValueError(
                "this checkpoint has no chat template (no 'chat_template' in tokenizer_config.json and no "
                "chat_template.jinja); send a plain prompt instead"
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of dicts, each with a 'role'")
        variables: dict[str, Any] = {name: text for name, text in self._specials.items() if text is not None}
        variables.update(template_vars, messages=messages, add_generation_prompt=add_generation_prompt)
        try:
            template = self._chat_template_compiled
            text = template.render(**variables)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template failed: {exc}") from exc
        if continue_final_message:
            final = str(messages[-1].get("content") or "") if messages else ""
            for piece in (final, final.strip()):
                if piece and piece in text:
                    return text[: text.rindex(piece) + len(piece)]
            raise ValueError("continue_final_message is set but the last message's content does not appear in the "
                             "rendered conversation")
        return text
