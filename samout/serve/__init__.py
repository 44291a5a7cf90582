"""`samout serve`: an OpenAI-compatible HTTP server with continuous batching, a
conversation-state cache and a web chat page (the shape of vLLM's OpenAI server).

    protocol.py     request models, the error object, response and chunk builders
    engine.py       the background loop that decodes every active request together
    state_cache.py  LRU of (token prefix -> state) within a byte budget
    loading.py      a run directory -> a ServedModel (engine, tokenizer, chat renderer)
    api_server.py   the FastAPI app
    static/         the chat page served at /
"""
