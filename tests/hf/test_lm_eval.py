"""lm-evaluation-harness, unchanged, on a samout run directory: its bits per byte equal
`samout eval`'s on the same text, and its multiple-choice log-likelihoods equal samout's."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from samout.cli import main  # noqa: E402
from samout.generation import load_for_generation  # noqa: E402
from samout.tokenizer import EOT_ID, TOKENIZER_NAME  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lm_eval"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The shipped example tasks, with their data files copied here (absolute paths)."""
    out = tmp_path_factory.mktemp("tasks")
    shutil.copytree(EXAMPLES / "texts", out / "texts")
    shutil.copy(EXAMPLES / "choice.jsonl", out / "choice.jsonl")
    for name, data in (("samout_text.yaml", str(out / "texts" / "*.txt")),
                       ("samout_choice.yaml", str(out / "choice.jsonl"))):
        task = yaml.safe_load((EXAMPLES / name).read_text())
        task["dataset_kwargs"]["data_files"]["test"] = data
        (out / name).write_text(yaml.safe_dump(task))
    return out


@pytest.fixture(scope="module")
def lm_eval_results(trained_run, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={trained_run},trust_remote_code=True",
        tasks=["samout_text", "samout_choice"], task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True, device="cpu", batch_size=1,
    )


def samout_eval(run_dir: Path, text: str, tmp_path: Path, template: Path) -> tuple[float, int]:
    """(nats, bytes) of `samout eval` on one document.

    lm-eval scores each document on its own: a fresh model state, the prefix token
    (the tokenizer's bos, <|endoftext|>), then every token of the document, and no end
    token. A data directory whose validation split is exactly <|endoftext|> + the
    document's tokens, evaluated in one window longer than it, predicts exactly those
    tokens (the first token of a split is context only), so the sums must agree.
    """
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(run_dir / TOKENIZER_NAME)).encode(text).ids
    data = tmp_path / f"doc{len(list(tmp_path.iterdir()))}"
    data.mkdir()
    meta = json.loads((template / "meta.json").read_text())
    split = np.asarray([EOT_ID] + ids, dtype=meta["dtype"])
    for name in ("train", "val"):
        split.tofile(data / f"{name}.bin")
        meta["splits"][name] = {"file": f"{name}.bin", "tokens": int(split.size),
                                "bytes": len(text.encode("utf-8")), "documents": 1}
    (data / "meta.json").write_text(json.dumps(meta))
    shutil.copy(run_dir / TOKENIZER_NAME, data / TOKENIZER_NAME)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", str(run_dir), "--data", str(data), "--seq-len", str(len(ids) + 8),
                     "--json", "--quiet"])
    assert code == 0
    result = json.loads(out.getvalue())
    assert result["tokens"] == len(ids) and result["bytes"] == len(text.encode("utf-8"))
    return result["loss"] * result["tokens"], result["bytes"]


def test_rolling_bits_per_byte_equal_samout_eval(trained_run, prepared_data, lm_eval_results, tmp_path):
    samples = lm_eval_results["samples"]["samout_text"]
    assert len(samples) == len(list((EXAMPLES / "texts").glob("*.txt")))
    nats = nbytes = 0
    for sample in samples:
        text = sample["doc"]["text"]
        doc_nats, doc_bytes = samout_eval(trained_run, text, tmp_path, prepared_data)
        loglik = float(np.ravel(sample["resps"])[0])
        assert loglik == pytest.approx(-doc_nats, rel=1e-5, abs=1e-3)
        nats, nbytes = nats + doc_nats, nbytes + doc_bytes
    ours = nats / (math.log(2) * nbytes)
    theirs = lm_eval_results["results"]["samout_text"]["bits_per_byte,none"]
    print(f"bits per byte: lm-eval {theirs:.6f}, samout eval {ours:.6f}")
    assert abs(theirs - ours) < 1e-4
    assert 1.0 < ours < 20.0  # a real figure, not a degenerate one


def test_multiple_choice_logliks_equal_samouts(trained_run, lm_eval_results):
    model, tokenizer = load_for_generation(trained_run)
    samples = lm_eval_results["samples"]["samout_choice"]
    assert len(samples) == 4
    correct = 0
    for sample in samples:
        context, choices = sample["doc"]["question"], sample["doc"]["choices"]
        ours = []
        for choice in choices:
            # lm-eval's split: encode context + " " + choice whole, the context alone; the
            # continuation is what the whole adds (no prefix token: the context is not empty).
            whole = tokenizer.encode(context + " " + choice).ids
            ctx = tokenizer.encode(context).ids
            cont = whole[len(ctx):]
            with torch.no_grad():
                logits, _ = model(torch.tensor([whole[:-1]]))
            logp = torch.log_softmax(logits[0, -len(cont):].float(), -1)
            ours.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        theirs = [float(np.ravel(r)[0]) for r in sample["resps"]]
        assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-4)
        correct += int(np.argmax(ours) == sample["doc"]["answer"])
    assert lm_eval_results["results"]["samout_choice"]["acc,none"] == pytest.approx(correct / len(samples))
