"""Byte-level BPE tokenizers (Hugging Face `tokenizers`), saved as `tokenizer.json`.

Fixed special tokens for every samout tokenizer: `<|pad|>` = 0, `<|endoftext|>` = 1.
Chat models also have the four chat tokens (`CHAT_TOKENS`: `<|system|>`, `<|user|>`,
`<|assistant|>`, `<|end|>`), special tokens found by name, never by a fixed id: a tokenizer
trained by `samout prepare --format chat` reserves them at ids 2-5, and one without them (a
pretrained run's) gets them appended at the end of its vocabulary (`add_chat_tokens`; the
model's embedding grows to match at `samout train --init-from`).
Byte-level means every string round-trips exactly and every token stands for a whole
number of bytes, which is what makes bits per byte exact (see `token_byte_lengths`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from samout.errors import SamoutError
from samout.files import TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, VOCAB_NAME, atomic_write
from samout.openash_tokenizer import OpenAshVocab

PAD_TOKEN, EOT_TOKEN = "<|pad|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOT_TOKEN]
PAD_ID, EOT_ID = 0, 1
# Chat role markers and the end-of-turn marker (see samout/chat/template.py).
SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN = "<|system|>", "<|user|>", "<|assistant|>"
END_OF_TURN_TOKEN = "<|end|>"
ROLE_TOKENS = {"system": SYSTEM_TOKEN, "user": USER_TOKEN, "assistant": ASSISTANT_TOKEN}
CHAT_TOKENS = [SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN]
DEFAULT_VOCAB_SIZE = 8192
# Special tokens plus the 256 byte symbols every byte-level BPE starts from.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    show_progress: bool = False, chat: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (special tokens included);
    `chat` reserves the chat tokens at ids 2-5."""
    check_vocab_size(vocab_size - (len(CHAT_TOKENS) if chat else 0))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + (CHAT_TOKENS if chat else []),  # ids 0, 1 (2-5), in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    check_special_tokens(tokenizer, "the trained tokenizer")
    tokenizer.encode_special_tokens = True
    return tokenizer


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise SamoutError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes); use --vocab-size {MIN_VOCAB_SIZE} or more"
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` (a file, or a directory holding one) and check its special tokens.

    A directory holding the seed author's vocabulary (`openash_vocab.json`, e.g. written by
    `samout convert openash`) gives a `samout.openash_tokenizer.OpenAshVocab`, which has the
    same interface as far as samout uses it.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if path.name == VOCAB_NAME or (not path.is_file() and (directory / VOCAB_NAME).is_file()):
        return OpenAshVocab.from_file(directory / VOCAB_NAME)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise SamoutError(f"tokenizer not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception
        raise SamoutError(f"{path} is not a valid {TOKENIZER_NAME}: {err}") from None
    check_special_tokens(tokenizer, str(path))
    # Text that spells "<|endoftext|>" is encoded as text: documents cannot inject a
    # boundary, and decode(encode(text)) == text for every string.
    tokenizer.encode_special_tokens = True
    return tokenizer


def document_prefix(tokenizer) -> list[int]:
    """The ids that precede a document's first token, as in training: [<|endoftext|>] for
    samout's tokenizers (documents follow it in the token stream). A tokenizer may declare
    its own (`document_prefix`): the author's OpenASH vocabulary starts documents bare."""
    return list(getattr(tokenizer, "document_prefix", (EOT_ID,)))


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids (no special tokens added), as `tokenizer.encode` gives them. Through
    `encode_batch_fast` where the tokenizer has it: it lets go of the GIL while it works, where
    `encode` holds it throughout, so that a long text tokenized on a worker thread does not
    stall the other threads (a server's event loop) for the whole of it."""
    batch = getattr(tokenizer, "encode_batch_fast", None)
    if batch is None:
        return [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    return [e.ids for e in batch(texts, add_special_tokens=False)]


def end_ids(tokenizer) -> frozenset[int]:
    """The ids at which generation stops: <|endoftext|> for samout's tokenizers, or what the
    tokenizer declares (`end_ids`; OpenASH: <|im_end|> and <|pad|>, as the author's code)."""
    return frozenset(getattr(tokenizer, "end_ids", (EOT_ID,)))


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(token) is not None for token in CHAT_TOKENS)


def add_chat_tokens(tokenizer: Tokenizer) -> list[str]:
    """Append the chat tokens the tokenizer lacks as special tokens (ids from its current
    size on); returns the ones added. Existing ids never change, so a model trained with the
    tokenizer keeps its meaning and only needs new embedding rows."""
    from tokenizers import AddedToken

    missing = [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return missing


def update_tokenizer_config(directory: str | Path, **fields) -> dict:
    """Set `fields` in DIRECTORY/tokenizer_config.json (Hugging Face's file), keeping the keys
    already there; written atomically. Returns the whole object."""
    data = read_tokenizer_config(directory)
    data.update(fields)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write(Path(directory) / TOKENIZER_CONFIG_NAME, text)
    return data


def read_tokenizer_config(directory: str | Path) -> dict:
    """DIRECTORY/tokenizer_config.json as a dict ({} when there is none)."""
    path = Path(directory) / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SamoutError(f"{path} is not valid JSON: fix or delete it") from None
    if not isinstance(data, dict):
        raise SamoutError(f"{path} must hold a JSON object")
    return data


def check_special_tokens(tokenizer: Tokenizer, where: str) -> None:
    for token, want in ((PAD_TOKEN, PAD_ID), (EOT_TOKEN, EOT_ID)):
        got = tokenizer.token_to_id(token)
        if got != want:
            raise SamoutError(
                f"{where}: special token {token} must have id {want}, got {got}; "
                "let `samout prepare` train a tokenizer, or add the special tokens first"
            )


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes->printable-characters map used by ByteLevel."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens).

    Exact for byte-level tokenizers, so the bytes of any evaluated stretch of tokens
    are known exactly; for other tokenizers, the UTF-8 length of the token's text.
    """
    decoder = _byte_decoder()
    special = set(SPECIAL_TOKENS + CHAT_TOKENS)
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, idx in tokenizer.get_vocab().items():
        if token in special or idx >= len(lengths):
            continue
        if all(ch in decoder for ch in token):
            lengths[idx] = len(token)
        else:
            lengths[idx] = len(token.encode("utf-8"))
    return lengths

