"""A conversation state as bytes, for the stores that outlive the process (state_store.py),
and the model identity that keeps two models from ever sharing states.

    MAGIC (8) | version, header length (struct "<HI") | header (JSON) | payload | checksum (32)

The header is padded with spaces so that the payload starts at a multiple of 64 bytes: a
value read into a bytearray is used in place by the state's tensors, aligned, not copied.

The header names the state's key (prefix length and BLAKE2b-256 digest of its ids), the
dtype, the layout (per layer: (name, shape) per tensor, batch first) and the payload's
size; the payload is the tensors' raw bytes in layout order; the checksum is BLAKE2b-256 of
everything before it. Nothing is unpickled: a state is read back with `torch.frombuffer`,
so bytes from a disk or a Redis shared with others can at worst be wrong, never run code.
A value is served only under the key its header names, so a file renamed or a value copied
to another key is refused, not served for the wrong prefix. The checksum detects
truncation and corruption, not a malicious writer (who can compute it too).
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

from samout.state import State

MAGIC = b"SAMOUTST"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<HI")  # version, header length
CHECKSUM_BYTES = 32
PAYLOAD_ALIGN = 64
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes per layer; more is not a state
# The dtypes a state may hold (a name from a header is looked up here, never with getattr).
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16,
                                                       torch.float64, torch.int8, torch.int32, torch.int64)}

Key = tuple[int, bytes]  # (prefix length, BLAKE2b-256 digest of its int32 ids)


class CorruptStateError(ValueError):
    """Bytes that are not a complete, intact state of the expected key."""


def _checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=CHECKSUM_BYTES).digest()


def encode_state(key: Key, state: State) -> bytes:
    """The bytes of `state` (batch 1, one dtype), the state after the prefix `key`."""
    tensors = [t for layer in state for t in layer.values()]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError("a stored state's tensors must share one dtype")
    dtype = dtypes.pop()
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"cannot store a state of dtype {name}")
    header = {"length": key[0], "digest": key[1].hex(), "dtype": name,
              "layout": [[[k, list(t.shape)] for k, t in layer.items()] for layer in state],
              "payload_bytes": sum(t.numel() for t in tensors) * tensors[0].element_size()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(len(MAGIC) + _FIXED.size + len(head)) % PAYLOAD_ALIGN)  # JSON allows the spaces
    flat = torch.cat([t.detach().reshape(-1).cpu() for t in tensors])
    payload = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    body = MAGIC + _FIXED.pack(FORMAT_VERSION, len(head)) + head + payload
    return body + _checksum(body)


def decode_state(data: bytes | bytearray, key: Key, device: torch.device | str = "cpu") -> State:
    """The state in `data`, which must be the state of `key`; CorruptStateError otherwise.
    A bytearray is used in place (the tensors keep it alive); bytes are copied once."""
    start = len(MAGIC) + _FIXED.size
    if len(data) < start + CHECKSUM_BYTES or data[:len(MAGIC)] != MAGIC:
        raise CorruptStateError("not a samout state (bad magic or too short)")
    version, head_len = _FIXED.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise CorruptStateError(f"state format version {version}, this samout reads {FORMAT_VERSION}")
    view = memoryview(data)
    if _checksum(view[:-CHECKSUM_BYTES]) != data[-CHECKSUM_BYTES:]:
        raise CorruptStateError("checksum mismatch (truncated or corrupted)")
    if head_len > MAX_HEADER_BYTES or start + head_len > len(data) - CHECKSUM_BYTES:
        raise CorruptStateError("header length out of range")
    try:
        header = json.loads(bytes(view[start:start + head_len]))
        length, digest = int(header["length"]), bytes.fromhex(header["digest"])
        dtype = DTYPES[header["dtype"]]
        layout = [[(str(k), tuple(int(n) for n in shape)) for k, shape in layer]
                  for layer in header["layout"]]
        payload_bytes = int(header["payload_bytes"])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptStateError(f"unreadable header: {type(err).__name__}") from None
    if (length, digest) != key:
        raise CorruptStateError("the header names another prefix than the key it was stored under")
    offset = start + head_len
    payload = view[offset:-CHECKSUM_BYTES]
    size = torch.empty(0, dtype=dtype).element_size()
    numels = [_numel(shape) for layer in layout for _, shape in layer]
    if len(payload) != payload_bytes or payload_bytes != sum(numels) * size or not layout:
        raise CorruptStateError("payload size does not match the layout")
    if not payload_bytes:
        flat = torch.empty(0, dtype=dtype)
    elif isinstance(data, bytearray) and offset % PAYLOAD_ALIGN == 0:
        flat = torch.frombuffer(data, dtype=dtype, count=payload_bytes // size, offset=offset)
    else:  # immutable bytes, or an unaligned payload: a fresh, aligned copy the tensors own
        flat = torch.frombuffer(bytearray(payload), dtype=dtype)
    layers, at = [], 0
    for layer in layout:
        tensors = {}
        for name, shape in layer:
            n = _numel(shape)
            tensors[name] = flat[at:at + n].view(shape).to(device)
            at += n
        layers.append(tensors)
    return State(layers)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise CorruptStateError("negative dimension in the layout")
        n *= d
    return n


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hex digest of what decides a model's states: its class, config, every weight (as
    loaded: a bf16 or int8 model differs from its float32 weights) and the device type
    (kernels differ between devices). Two models share stored states only when these are
    equal. Costs one pass over the weights (about 0.3 s per GB), once at start-up."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(model).__name__}|{getattr(model, 'config', None)!r}|v{FORMAT_VERSION}|".encode())
    device = next(model.parameters()).device.type
    h.update(device.encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):  # packed forms derive from the saved tensors
            continue
        if t.is_quantized:
            t = t.int_repr()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().reshape(-1).contiguous().cpu()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()
