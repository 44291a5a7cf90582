"""`Conversation`: a chat whose whole history is the model's state.

Each turn feeds only the new message's tokens (and the `<|assistant|>` prompt) on top of the
state; the reply is sampled token by token and fed back as it is produced; the turn's
`<|end|>` closes it. So the state after n turns is exactly the state of the model run on the
whole rendered conversation, while a turn's cost depends on that turn alone.

    chat = Conversation.load_run("runs/sft", temperature=0)
    print("".join(chat.send("Which number is the largest: 3 9 4?")))
    chat.save("convo")            # convo.safetensors (the state) + convo.json (the transcript)
    chat = Conversation.load_run("runs/sft"); chat.load("convo")   # continues bit-identically

With a sampling seed, turn k samples with seed + k, so a loaded conversation continues
exactly as the original would have.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from samout.chat.template import (
    DEFAULT_CHAT_TEMPLATE,
    check_chat_tokenizer,
    check_messages,
    encode_rendered,
    end_of_turn_ids,
    load_chat_template,
    render_text,
    turn_text,
)
from samout.decoding.detokenizer import text_pieces
from samout.decoding.sampler import RowSampler, sample_one
from samout.errors import SamoutError
from samout.files import atomic_write
from samout.generation import SamplingParams
from samout.run_dir import load
from samout.state import State
from samout.tokenizer import end_ids

SAVE_FORMAT = "samout-conversation"
SAVE_VERSION = 1


class Conversation:
    def __init__(self, model: torch.nn.Module, tokenizer, template: str | None = None,
                 system: str | None = None, **sampling) -> None:
        self.template = template or DEFAULT_CHAT_TEMPLATE
        if self.template == DEFAULT_CHAT_TEMPLATE:
            check_chat_tokenizer(tokenizer)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.params = SamplingParams(**sampling)
        # What closes a reply (<|end|>, or <|im_end|> for the author's OpenASH models), and
        # where a reply stops: that, or the end of text.
        self.close_ids = end_of_turn_ids(tokenizer, self.template)
        self.end_id = self.close_ids[0]
        self.stop_ids = end_ids(tokenizer) | {self.end_id}
        self.device = next(model.parameters()).device
        self.system = system
        self.reset()

    @classmethod
    def load_run(cls, run_dir: str | Path, device: str = "cpu", system: str | None = None,
                 dtype: str = "float32", **sampling) -> Conversation:
        model, tokenizer = load(run_dir, device, dtype=dtype)
        return cls(model, tokenizer, load_chat_template(run_dir), system=system, **sampling)

    # -- the conversation ----------------------------------------------------
    def reset(self, system: str | None = None) -> None:
        """Start over (optionally with a new system prompt): an empty state and transcript."""
        if system is not None:
            self.system = system or None
        self.state: State | None = None
        self.transcript: list[dict[str, str]] = []
        self.tokens_seen = 0  # tokens the state has absorbed
        self.last_fed: list[int] = []  # the ids fed for the last turn's prompt
        self.last_reply_ids: list[int] = []
        self.last_ended = False  # whether the last reply ended with <|end|> (not max_new_tokens)

    @property
    def turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.transcript)

    def turn_ids(self, message: str) -> list[int]:
        """The ids a new user turn feeds: the text the template adds for it (its message and
        the generation prompt; on a new conversation also the system prompt and what the
        template starts with, e.g. <|endoftext|>)."""
        prior = [{"role": "system", "content": self.system}] if self.system else []
        new = check_messages([{"role": "user", "content": message}])[0]
        if self.state is None:  # a new conversation: all of its text so far
            text = render_text([*prior, new], self.template, add_generation_prompt=True)
        else:
            text = turn_text([*prior, *self.transcript], new, self.template)
        return encode_rendered(self.tokenizer, text)

    def _feed(self, ids: list[int]) -> torch.Tensor:
        logits, self.state = self.model(torch.tensor([ids], device=self.device), state=self.state,
                                        logits_to_keep=1)
        self.tokens_seen += len(ids)
        return logits[0, -1]

    @torch.no_grad()
    def send_ids(self, message: str, **sampling) -> Iterator[int]:
        """Yield the reply's token ids (without <|end|>)."""
        params = SamplingParams(**{**asdict(self.params), **sampling})
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(params.seed + self.turns)
        self.last_fed = self.turn_ids(message)
        logits = self._feed(self.last_fed)
        self.transcript.append({"role": "user", "content": message})
        row = RowSampler(params, prompt=self.last_fed, stop_ids=self.stop_ids, generator=generator)
        reply: list[int] = []
        self.last_ended = False
        for _ in range(params.max_new_tokens):
            token, _ = sample_one(logits.cpu(), row)
            if token in self.stop_ids:  # a reply always ends at <|end|> (or end of text)
                self.last_ended = token == self.end_id
                break
            row.accept(token)
            reply.append(token)
            yield token
            logits = self._feed([token])
            if row.finished:
                break
        self._feed(self.close_ids)  # close the turn as the template does
        self.last_reply_ids = reply
        self.transcript.append({"role": "assistant",
                                "content": self.tokenizer.decode(reply, skip_special_tokens=True)})

    def send(self, message: str, **sampling) -> Iterator[str]:
        """Yield the reply as text pieces (waiting where a UTF-8 character spans tokens)."""
        yield from text_pieces(self.tokenizer, self.send_ids(message, **sampling))

    def reply(self, message: str, **sampling) -> str:
        return "".join(self.send(message, **sampling))

    # -- save and load ------------------------------------------------------
    def save(self, name: str | Path) -> tuple[Path, Path]:
        """NAME.safetensors (the state) and NAME.json (transcript, system prompt, counts)."""
        base = Path(name)
        tensors_path, json_path = _paths(base)
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {} if self.state is None else {k: v.detach().cpu().contiguous()
                                                 for k, v in self.state.to_tensors().items()}
        tmp = tensors_path.with_name(f".{tensors_path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": SAVE_FORMAT})
        tmp.replace(tensors_path)
        atomic_write(json_path, json.dumps({"format": SAVE_FORMAT, "version": SAVE_VERSION,
                                            "system": self.system, "tokens_seen": self.tokens_seen,
                                            "transcript": self.transcript},
                                           indent=2, ensure_ascii=False) + "\n")
        return tensors_path, json_path

    def load(self, name: str | Path) -> None:
        base = Path(name)
        tensors_path, json_path = _paths(base)
        if not json_path.is_file() or not tensors_path.is_file():
            raise SamoutError(f"no saved conversation {base} (need {json_path.name} and "
                              f"{tensors_path.name})")
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SamoutError(f"{json_path} is not valid JSON") from None
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
            raise SamoutError(f"{json_path} is not a saved samout conversation")
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError) as err:
            raise SamoutError(f"{tensors_path} is corrupted: {err}") from None
        state = None
        if tensors:
            try:
                state = State.from_tensors(tensors).to(self.device)
                self.model._check_state(state, 1)
            except (ValueError, AttributeError) as err:
                raise SamoutError(f"{tensors_path} does not fit this model: {err}") from None
        self.reset()
        self.state, self.system = state, data.get("system")
        self.transcript = list(data.get("transcript", []))
        self.tokens_seen = int(data.get("tokens_seen", 0))


def _paths(base: Path) -> tuple[Path, Path]:
    """NAME.safetensors and NAME.json of a saved conversation NAME."""
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")
