"""`samout serve`: an OpenAI-compatible HTTP server with continuous batching, a
conversation-state cache and a web chat page (split the way vLLM's OpenAI server is).

    protocol.py              request models, the error object, response and chunk builders
    serving.py               what the endpoints share: limits, submission, events -> responses
    serving_completions.py   /v1/completions: prompts in OpenAI's four forms
    serving_chat.py          /v1/chat/completions: messages through the chat template
    detokenizer.py           token ids -> text pieces, stop strings
    api_server.py            the FastAPI app: routes, errors, API key, the page
    engine.py                the background loop that decodes every active request together
    state_cache.py           LRU of (token prefix -> state) within a byte budget
    loading.py               a run directory -> a ServedModel (engine, tokenizer, chat renderer)
    static/                  the chat page served at /

Process memory (the /health figures, trimming the heap when idle) is samout.procmem.
"""
