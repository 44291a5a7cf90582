"""POST /v1/completions (the shape of vLLM's `serving_completion.py`): the prompt in any of
OpenAI's four forms, and the `text_completion` response and chunks."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import StreamingResponse

from samout.serve import protocol as P
from samout.serve.protocol import OpenAIError
from samout.serve.serving import OpenAIServing, Run, ServedModel, sse
from samout.tokenizer import document_prefix, encode_texts, end_ids

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class CompletionRun(Run):
    id_prefix = "cmpl"

    def _chunk(self, index: int, text: str | None, finish: str | None, usage: dict | None = None) -> str:
        chunk = P.completion_chunk(self.rid, self.served.name, self.created, index, text or "", finish, usage)
        return sse(chunk, ensure_ascii=False)

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
        return await self.generate(body, served, prompts, request)

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
