"""`samout bench params`: parameter counts of SamOut and softmax Transformers (no
training, nothing allocated: models are built on the meta device).

For each SamOut preset, two Transformers of the same vocabulary, width and depth:
  standard  the textbook FFN of 4 x hidden_size (what the seeds' "comparable
            Transformer" most plausibly means: the seed-004 style, ReLU FFN), and
  matched   the FFN width `match_transformer_to` solves for (non-embedding counts
            within 2%), the model every other benchmark compares against, in the
            `--baseline` style (modern by default; seed-004 for the figures before issue 24).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from samout.bench.arguments import add_baseline_argument
from samout.bench.common import parameter_counts, prepare_out_dir, write_json
from samout.config import PRESETS, SamOutConfig
from samout.models.samout import SamOut
from samout.models.transformer import Transformer
from samout.models.transformer_config import DEFAULT_BASELINE, TransformerConfig, match_transformer_to
from samout.run_dir import atomic_write

SEED_PRESETS = [p for p in PRESETS if p.startswith("seed-")] + ["openash-85m"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flag of `samout bench params` (it measures nothing, so none of the shared ones)."""
    parser.add_argument("--out", help="also write params.json (and params.md) into this directory")
    add_baseline_argument(parser)


def run(args: argparse.Namespace) -> int:
    """`samout bench params`: print the table; with --out, write it as JSON and Markdown too."""
    baseline = args.baseline or DEFAULT_BASELINE
    rows = parameter_table(baseline=baseline)
    table = format_params(rows, baseline)
    print(table)
    if args.out:
        out = prepare_out_dir(args.out)
        write_json(out / "params.json", {"benchmark": "params", "baseline": baseline, "rows": rows})
        atomic_write(out / "params.md", table + "\n")
    return 0


def parameter_table(presets: list[str] | None = None,
                    baseline: str = DEFAULT_BASELINE) -> list[dict[str, Any]]:
    rows = []
    for name in presets or SEED_PRESETS:
        config = SamOutConfig.from_preset(name)
        standard = TransformerConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_layers,
            num_heads=config.num_heads, ffn_hidden_size=4 * config.hidden_size,
            padding_idx=config.padding_idx,
        )
        matched = match_transformer_to(config, baseline)
        with torch.device("meta"):
            s, t, m = SamOut(config), Transformer(standard), Transformer(matched)
        rows.append({
            "preset": name, "mixer": config.mixer, "samout": parameter_counts(s),
            "transformer_4d_ffn": parameter_counts(t), "transformer_matched": parameter_counts(m),
            "matched_ffn_hidden_size": matched.ffn_hidden_size,
            "fewer_than_4d_ffn": 1 - s.num_parameters() / t.num_parameters(),
            "fewer_than_4d_ffn_non_embedding": 1 - parameter_counts(s)["non_embedding_parameters"]
            / parameter_counts(t)["non_embedding_parameters"],
        })
    return rows


def format_params(rows: list[dict[str, Any]], baseline: str = DEFAULT_BASELINE) -> str:
    lines = [
        "| preset | mixer | SamOut params (non-emb.) | Transformer, FFN 4D (non-emb.) | SamOut fewer by"
        f" (non-emb.) | matched {baseline} Transformer FFN width (non-emb. params) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, t, m = r["samout"], r["transformer_4d_ffn"], r["transformer_matched"]
        lines.append(
            f"| {r['preset']} | {r['mixer']} | {s['parameters']:,} ({s['non_embedding_parameters']:,}) | "
            f"{t['parameters']:,} ({t['non_embedding_parameters']:,}) | {r['fewer_than_4d_ffn']:.1%} "
            f"({r['fewer_than_4d_ffn_non_embedding']:.1%}) | {r['matched_ffn_hidden_size']} "
            f"({m['non_embedding_parameters']:,}) |"
        )
    return "\n".join(lines)
