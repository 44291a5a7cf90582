"""Generate text with an exported SamOut model using onnxruntime, tokenizers and numpy only.

    samout export RUN_DIR --onnx model-onnx
    python examples/onnx_generate.py model-onnx --prompt "Shall I compare thee" --max-new-tokens 60

No torch: this is what runs on an edge device. The model's whole memory is one small
array per layer (the running max), passed back into every decode step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class Model:
    def __init__(self, onnx_dir: Path) -> None:
        self.manifest = json.loads((onnx_dir / "samout_onnx.json").read_text())
        providers = ["CPUExecutionProvider"]
        self.decode = ort.InferenceSession(str(onnx_dir / self.manifest["decode"]), providers=providers)
        self.prefill = ort.InferenceSession(str(onnx_dir / self.manifest["prefill"]), providers=providers)

    def empty_state(self, batch: int) -> list[np.ndarray]:
        _, heads, head_dim = self.manifest["state_shape"]
        # The running max of nothing is -inf.
        return [np.full((batch, heads, head_dim), -np.inf, np.float32)] * self.manifest["num_layers"]

    def __call__(self, ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the last position and the new state; long inputs go in chunks."""
        limit = self.manifest["max_prefill_len"]
        for start in range(0, ids.shape[1], limit):
            chunk = ids[:, start : start + limit]
            session = self.decode if chunk.shape[1] == 1 else self.prefill
            logits, *state = session.run(None, {"input_ids": chunk,
                                                **dict(zip(self.manifest["state_inputs"], state))})
        return logits[:, -1], state


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.astype(np.float64) / temperature
    if 0 < top_k < logits.size:
        logits[logits < np.sort(logits)[-top_k]] = -np.inf
    p = np.exp(logits - logits.max())
    return int(rng.choice(logits.size, p=p / p.sum()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", type=Path, help="directory written by `samout export --onnx`")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--int8", action="store_true", help="use the int8 graphs (export --quantize int8)")
    args = parser.parse_args(argv)

    model = Model(args.onnx_dir)
    if args.int8:
        model.decode = ort.InferenceSession(str(args.onnx_dir / "decode.int8.onnx"),
                                            providers=["CPUExecutionProvider"])
        model.prefill = ort.InferenceSession(str(args.onnx_dir / "prefill.int8.onnx"),
                                             providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(args.onnx_dir / "tokenizer.json"))
    rng = np.random.default_rng(args.seed)
    # As in `samout generate`: the prompt follows <|endoftext|>, where documents start.
    eot = model.manifest["eos_token_id"]
    ids = np.array([[eot] + tokenizer.encode(args.prompt, add_special_tokens=False).ids], dtype=np.int64)
    logits, state = model(ids, model.empty_state(1))
    out: list[int] = []
    for _ in range(args.max_new_tokens):
        token = sample(logits[0], args.temperature, args.top_k, rng)
        if token == eot:
            break
        out.append(token)
        logits, state = model(np.array([[token]], dtype=np.int64), state)
    print(args.prompt + tokenizer.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
