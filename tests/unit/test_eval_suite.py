"""tools/eval_lm.py --suite paper: the protocol's task list, and one clear line (before any
model is loaded) when its data is not available offline."""

import json
import os

from launch import run_script
from mesh_megatron import evaluation


def test_paper_suite_is_the_nine_tasks_of_the_paper():
    assert evaluation.PAPER_ZERO_SHOT == ("lambada_openai", "lambada_standard", "hellaswag", "piqa", "winogrande",
                                          "arc_easy", "arc_challenge", "sciq", "mmlu_continuation")
    fake = {"results": {"piqa": {"acc,none": 0.6, "acc_norm,none": 0.61}, "sciq": {"acc,none": 0.8},
                        "wikitext": {"word_perplexity,none": 30.0},
                        "lambada_openai": {"perplexity,none": 20.0, "acc,none": 0.4}}}
    s = evaluation.paper_summary(fake, {"perplexity": 12.5})
    assert s["zero_shot_acc"] == {"lambada_openai": 0.4, "piqa": 0.6, "sciq": 0.8}
    assert abs(s["zero_shot_avg_acc"] - 0.6) < 1e-12 and s["zero_shot_tasks_run"] == 3
    assert (s["pile_perplexity"], s["wikitext_word_perplexity"], s["lambada_openai_perplexity"]) == (12.5, 30.0, 20.0)


def test_missing_data_is_one_clear_line(tmp_path):
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))  # never loaded
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(2)}, str(model_dir / "model.safetensors"))  # whole, as paths.check_hf_dir asks
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_DATASETS_CACHE=str(tmp_path / "hf_home" / "ds"))
    proc = run_script("tools/eval_lm.py", ["--model-dir", str(model_dir), "--suite", "paper", "--offline",
                                           "--output", str(tmp_path / "r.json")], env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    line = errors[0]
    assert "--suite paper: data not available for 11 of 11 evaluations: pile (no --pile-data)" in line
    for task in (*evaluation.PAPER_ZERO_SHOT, "wikitext"):
        assert task in line
    assert "Fix: pass --pile-data PREFIX" in line and "--skip-unavailable" in line
    assert not (tmp_path / "r.json").exists()
