"""Loading a run directory for serving: the chat renderer, and `dtype` (samout serve --dtype)
giving the low-precision model, served with the tokens `samout.generation` gives it."""

from __future__ import annotations

import pytest
import torch

from samout.generation import SamplingParams, stream_ids
from samout.quant import KEEP_FLOAT, BF16Linear, Int8Linear
from samout.serve.engine import Engine
from samout.serve.loading import load_served_model
from tests.serve.test_engine import Collector, run_jobs


@pytest.mark.parametrize("which, dtype, layer", [("samout", "int8", Int8Linear),
                                                 ("transformer", "bfloat16", BF16Linear),
                                                 ("transformer", "float32", torch.nn.Linear)])
def test_dtype_loads_the_low_precision_model_and_serves_it(serve_models, which, dtype, layer):
    run_dir = serve_models[3] if which == "samout" else serve_models[4]
    served = load_served_model(run_dir, dtype=dtype, state_cache_mb=0)
    model = served.engine.model
    assert served.dtype == dtype and served.render_chat is not None
    assert any(type(m) is layer for m in model.modules())
    if dtype != "float32":
        kept = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
        assert all(n.rsplit(".", 1)[-1] in KEEP_FLOAT for n in kept), kept
    if which == "transformer":  # works whatever replaced the Linear layers
        assert model.init_state(2).batch_size == 2
    prompt = served.render_chat([{"role": "user", "content": "hello there"}])
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_at_eot=False)
    [out] = run_jobs(Engine(model), [(prompt, params)])
    assert isinstance(out, Collector) and out.tokens == list(stream_ids(model, prompt, params))


def test_unknown_dtype_is_refused(serve_models):
    with pytest.raises(ValueError, match="unknown inference dtype 'fp16'"):
        load_served_model(serve_models[3], dtype="fp16")
