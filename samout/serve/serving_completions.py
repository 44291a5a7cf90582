"""POST /v1/completions (the shape of vLLM's `serving_completion.py`): the prompt in any of
OpenAI's four forms, and the `text_completion` response and chunks."""

from __future__ import annotations

import codecs

from starlette.requests import Request
from starlette.responses import StreamingResponse

from samout.decoding.detokenizer import token_bytes
from samout.decoding.grammar import response_format_constraint
from samout.decoding.logprobs import TokenLogprob
from samout.serve import protocol as P
from samout.serve.protocol import OpenAIError
from samout.serve.serving import OpenAIServing, Run, ServedModel, finite, sse, token_text
from samout.tokenizer import document_prefix, encode_texts, end_ids

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class CompletionRun(Run):
    id_prefix = "cmpl"

    def _chunk(self, index: int, text: str | None, finish: str | None, usage: dict | None = None,
               logprobs: dict | None = None) -> str:
        chunk = P.completion_chunk(self.rid, self.served.name, self.created, index, text or "", finish, usage,
                                   logprobs)
        return sse(chunk, ensure_ascii=False)

    def _logprobs_object(self, index: int, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """OpenAI's legacy format: parallel lists (the prompt's first token: null logprobs).
        text_offset: where each token's text starts in the choice's text (a token ending inside
        a character starts where that character does; special tokens take no text)."""
        tokenizer = self.served.tokenizer
        if not hasattr(self, "_utf8"):
            self._utf8: dict[int, codecs.IncrementalDecoder] = {}
        utf8 = self._utf8.setdefault(index, codecs.getincrementaldecoder("utf-8")(errors="replace"))
        tokens, logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            tokens.append(token_text(tokenizer, entry.token))
            logprobs.append(finite(entry.logprob))
            tops.append(None if entry.logprob is None
                        else {token_text(tokenizer, t): finite(lp) for t, lp in entry.top})
            offsets.append(offset)
            if tokenizer.decode([entry.token], skip_special_tokens=True):  # not a special token
                offset += len(utf8.decode(token_bytes(tokenizer, entry.token)))
        obj = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
        return obj, offset

    def _echo_text(self, index: int) -> str:
        if not self.body.echo:
            return ""
        return self.served.tokenizer.decode(self.requests[index].prompt.tolist(), skip_special_tokens=True)

    def _response(self, choices: list[dict], usage: dict) -> dict:
        return P.completion_response(self.rid, self.served.name, self.created, choices, usage)

    def _usage_chunk(self, usage: dict) -> dict:
        return P.usage_chunk(self.rid, self.served.name, self.created, False, usage)


class OpenAIServingCompletion(OpenAIServing):
    run_class = CompletionRun
    default_max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    prompt_param = "prompt"

    async def create_completion(self, body: P.CompletionRequest,
                                request: Request) -> dict | StreamingResponse:
        self.check_request(body)
        served = self.pick_model(body.model)
        self.check_choices(served, prompt_count(body.prompt), body.n)
        chars = prompt_chars(body.prompt)
        self.check_prompt_chars(chars)
        prompts = await self.off_loop(chars, completion_prompts, body, served)
        constraint = None
        if body.response_format is not None:  # vLLM's extension: OpenAI's is chat only
            constraint = await self.build_constraint(response_format_constraint, served.tokenizer,
                                                     body.response_format, "response_format",
                                                     end_ids(served.tokenizer))
        return await self.generate(body, served, prompts, request, constraint)

    def stop_ids(self, served: ServedModel) -> frozenset[int]:
        return end_ids(served.tokenizer)

    def release_prompt(self, body: P.CompletionRequest) -> None:
        body.prompt = ""


def prompt_count(prompt: str | list) -> int:
    """How many prompts `prompt` holds (one text or one list of token ids: 1)."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def prompt_chars(prompt: str | list) -> int:
    """The characters of the prompt's texts (0 for token ids)."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) for p in prompt if isinstance(p, str))


def completion_prompts(body: P.CompletionRequest, served: ServedModel) -> list[list[int]]:
    """The prompts' token ids: texts encoded, token ids checked against the vocabulary."""
    prompt = body.prompt
    if not prompt and not isinstance(prompt, str):
        raise OpenAIError(400, "'prompt' is empty", param="prompt")
    if isinstance(prompt, str) or all(isinstance(p, str) for p in prompt):
        # generation.encode_prompt's ids, in one call that lets go of the GIL (encode_texts)
        prefix = document_prefix(served.tokenizer)
        return [prefix + ids for ids in encode_texts(served.tokenizer, [prompt] if isinstance(prompt, str)
                                                     else prompt)]
    token_lists = prompt if isinstance(prompt[0], list) else [prompt]
    vocab = served.tokenizer.get_vocab_size()
    for ids in token_lists:
        if not ids:
            raise OpenAIError(400, "a token-id prompt in 'prompt' is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:  # builtins: a long history costs microseconds
            raise OpenAIError(400, f"token ids in 'prompt' must lie in [0, {vocab})", param="prompt")
    return token_lists  # the request body's lists; the engine keeps int32 copies
