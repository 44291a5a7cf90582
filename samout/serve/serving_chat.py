"""POST /v1/chat/completions (the shape of vLLM's `serving_chat.py`): messages rendered with
the run's chat template, and the `chat.completion` response and chunks."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import StreamingResponse

from samout.decoding.detokenizer import token_bytes
from samout.decoding.logprobs import TokenLogprob
from samout.errors import SamoutError
from samout.serve import protocol as P
from samout.serve.protocol import OpenAIError
from samout.serve.serving import OpenAIServing, Run, ServedModel, finite, sse, token_text

CHAT_DEFAULT_MAX_TOKENS = 512


class ChatRun(Run):
    id_prefix = "chatcmpl"

    def _chunk(self, index: int, text: str | None, finish: str | None, usage: dict | None = None,
               logprobs: dict | None = None, role: bool = False) -> str:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        chunk = P.chat_chunk(self.rid, self.served.name, self.created, index, delta, finish, usage, logprobs)
        return sse(chunk, ensure_ascii=False)

    def _logprobs_object(self, index: int, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """The chat format: one object per token, with its bytes and its top tokens."""
        tokenizer = self.served.tokenizer

        def item(token: int, logprob: float) -> dict:
            return {"token": token_text(tokenizer, token), "logprob": finite(logprob),
                    "bytes": list(token_bytes(tokenizer, token))}

        content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                   for e in entries]
        return {"content": content, "refusal": None}, offset

    def _opening_chunks(self) -> list[str]:
        return [self._chunk(i, None, None, role=True) for i in range(len(self.requests))]

    def _response(self, choices: list[dict], usage: dict) -> dict:
        return P.chat_response(self.rid, self.served.name, self.created, choices, usage)

    def _usage_chunk(self, usage: dict) -> dict:
        return P.usage_chunk(self.rid, self.served.name, self.created, True, usage)


class OpenAIServingChat(OpenAIServing):
    run_class = ChatRun
    default_max_tokens = CHAT_DEFAULT_MAX_TOKENS
    prompt_param = "messages"

    async def create_chat_completion(self, body: P.ChatCompletionRequest,
                                     request: Request) -> dict | StreamingResponse:
        self.check_request(body)
        served = self.pick_model(body.model)
        self.check_choices(served, 1, body.n)
        chars = sum(len(m.text()) for m in body.messages)
        self.check_prompt_chars(chars)
        prompt = await self.off_loop(chars, chat_prompt, body, served)
        return await self.generate(body, served, [prompt], request)

    def stop_ids(self, served: ServedModel) -> frozenset[int]:
        return served.chat_stop_ids


def chat_prompt(body: P.ChatCompletionRequest, served: ServedModel) -> list[int]:
    """The messages rendered with the model's chat template, ending in the assistant marker."""
    if served.render_chat is None:
        raise OpenAIError(400, f"model {served.name!r} has no chat template (its run directory's "
                               "tokenizer_config.json holds no \"chat_template\"): use /v1/completions",
                          param="messages", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return served.render_chat(messages)
    except SamoutError as err:
        raise OpenAIError(400, str(err), param="messages") from None
