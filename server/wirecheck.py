"""Explain why a protobuf message failed to parse, from its bytes.

protobuf's Python runtime refuses a message whose string field holds invalid UTF-8 with a bare
"String field had bad UTF-8", naming neither the field nor the byte. `bad_utf8_field` walks the wire
format itself, guided by the message's descriptor, and names the first such field:

    tag = (field_number << 3) | wire_type      varint
    wire_type 0: varint   1: 8 bytes   2: varint length + that many bytes   5: 4 bytes
    a length-delimited field is a string (check its UTF-8), a sub-message (walk it) or bytes (skip)

Nothing here allocates more than the input: it only slices `data`. Malformed input is not an error:
the walk stops and says what it found so far (usually nothing). `top_level_fields` reads only tags and
lengths, so a server can refuse an oversized field before protobuf parses the message.
"""

from __future__ import annotations

from typing import NamedTuple

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_MAX_DEPTH = 32  # protobuf's own default recursion limit is 100; our messages nest 3 deep


class BadUtf8(NamedTuple):
    path: str  # "prompt", "sampling.stop[1]"
    offset: int  # of the first bad byte within the field's value
    byte: int


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); raises IndexError/ValueError on a truncated or overlong varint."""
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def bad_utf8_field(data: bytes, descriptor: Descriptor, prefix: str = "", depth: int = 0) -> BadUtf8 | None:
    """The first string field of `data` (a serialized `descriptor` message) that is not valid UTF-8,
    or None when there is none or the bytes are malformed before one is found."""
    if depth > _MAX_DEPTH:
        return None
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None  # groups or garbage: not a message of ours
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
            if len(value) != length:
                return None
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = seen.get(number, 0)
            seen[number] = index + 1
            name = f"{prefix}{field.name}"
            if _is_repeated(field):
                name += f"[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return BadUtf8(name, exc.start, value[exc.start])
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = bad_utf8_field(value, field.message_type, name + ".", depth + 1)
                if found is not None:
                    return found
    except (IndexError, ValueError):
        return None
    return None


class WireField(NamedTuple):
    number: int
    wire_type: int
    length: int  # bytes of the value (a varint's own bytes for wire type 0)


def top_level_fields(data: bytes, max_fields: int) -> tuple[list[WireField], bool]:
    """The first `max_fields` fields of the serialized message `data`, read from their tags and lengths
    alone (no value is copied), and whether that was all of them. Malformed bytes end the walk as if
    complete: protobuf's own parse then refuses them."""
    found: list[WireField] = []
    pos = 0
    try:
        while pos < len(data):
            if len(found) == max_fields:
                return found, False
            tag, pos = _varint(data, pos)
            wire_type = tag & 7
            start = pos
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, start = _varint(data, pos)
                pos = start + length
            else:
                break
            if pos > len(data):  # truncated: claims more bytes than there are
                break
            found.append(WireField(tag >> 3, wire_type, pos - start))
    except (IndexError, ValueError):
        pass
    return found, True


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 has `is_repeated`; older runtimes only `label`
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def explain_decode_error(data: bytes, descriptor: Descriptor | None, error: BaseException) -> str:
    """A message a person can act on for a request that did not parse."""
    name = descriptor.full_name if descriptor is not None else "the request"
    bad = bad_utf8_field(data, descriptor) if descriptor is not None else None
    if bad is not None:
        return (f"field {bad.path} of {name} is not valid UTF-8 (byte 0x{bad.byte:02x} at offset {bad.offset}); "
                f"string fields must be UTF-8 text (send token ids in prompt_token_ids instead of raw bytes)")
    return f"the {name} message could not be parsed ({len(data)} bytes): {error}"
