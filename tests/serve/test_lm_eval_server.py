"""lm-evaluation-harness against `samout serve`: `--model local-completions` (token-id
requests, echo + logprobs: the server scores prompts) gives the numbers `--model hf` gives on
the same run directory, for a loglikelihood_rolling task (bits per byte) and a multiple-choice
task (acc, acc_norm)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from samout.serve.api_server import ServerSettings  # noqa: E402
from samout.serve.loading import load_served_model  # noqa: E402
from tests.hf.test_lm_eval import task_dir  # noqa: E402, F401  (the shipped example tasks)
from tests.serve.serve_fixtures import running_server  # noqa: E402

TASKS = ["samout_text", "samout_choice"]


def evaluate(model: str, model_args: str, tasks_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS,
                                   task_manager=TaskManager(include_path=str(tasks_path)), log_samples=True,
                                   device="cpu", batch_size=1)


@pytest.fixture(scope="module")
def results(trained_run, task_dir):  # noqa: F811
    hf = evaluate("hf", f"pretrained={trained_run},trust_remote_code=True", task_dir)
    served = load_served_model(trained_run, "tiny", prefill_chunk=64)
    try:
        with running_server([served], ServerSettings()) as url:
            api = evaluate("local-completions",
                           f"base_url={url}/v1/completions,model=tiny,tokenizer={trained_run},"
                           "tokenizer_backend=huggingface,tokenized_requests=True,trust_remote_code=True,"
                           "max_retries=1", task_dir)
    finally:
        served.engine.shutdown(drain=False, timeout=5)
    return hf, api


def _logliks(result, task):
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [float(np.ravel(s["resps"])[0]) for s in samples]


def test_rolling_bits_per_byte_equal_hf(results):
    hf, api = results
    ours, theirs = (r["results"]["samout_text"]["bits_per_byte,none"] for r in (api, hf))
    print(f"bits per byte: local-completions {ours:.6f}, hf {theirs:.6f}")
    assert abs(ours - theirs) < 1e-4
    assert _logliks(api, "samout_text") == pytest.approx(_logliks(hf, "samout_text"), rel=1e-5, abs=1e-3)


def test_multiple_choice_acc_equal_hf(results):
    hf, api = results
    for metric in ("acc,none", "acc_norm,none"):
        assert api["results"]["samout_choice"][metric] == hf["results"]["samout_choice"][metric], metric
    assert _logliks(api, "samout_choice") == pytest.approx(_logliks(hf, "samout_choice"), rel=1e-5, abs=1e-4)
