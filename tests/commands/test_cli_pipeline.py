"""prepare -> train -> resume -> generate -> eval through the command line."""

import json

from samout.cli import main


def test_pipeline_through_the_cli(capsys, tmp_path, play_files):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", *play_files[:2], "--out", str(data), "--vocab-size", "300", "--quiet"]) == 0
    assert "vocab 300" in capsys.readouterr().out
    common = ["--data", str(data), "--out", str(run), "--preset", "tiny", "--seq-len", "32",
              "--batch-size", "4", "--eval-every", "2", "--eval-windows", "2", "--save-every", "2", "--quiet"]
    assert main(["train", *common, "--max-steps", "2"]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "4", "--resume",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "done: step 4" in out and "val bits/byte" in out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\nWhat\n")
    assert main(["generate", str(run), "--prompts-file", str(prompts), "--max-new-tokens", "5",
                 "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be") and "\nWhat" in out
    assert main(["eval", str(run), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and 0 < result["bits_per_byte"] < 10
    assert main(["eval", str(run), "--data", str(data), "--max-windows", "2", "--quiet"]) == 0
    assert "bits per byte" in capsys.readouterr().out
