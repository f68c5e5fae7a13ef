"""Evaluate an exported Hugging Face directory: lm-evaluation-harness tasks, and perplexity
on a split of an indexed dataset (the same megatron-core GPTDataset samples training uses).

Both load the model with AutoModelForCausalLM (trust_remote_code=True, which the native
GPT-NeoX export simply ignores), so what is measured is the exported artefact.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Optional, Sequence

import torch

from mesh_megatron.conversion.from_hf import find_tokenizer
from mesh_megatron.config import ConfigError

SPLITS = ("train", "valid", "test")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_model_dir(model_dir: str) -> None:
    """config.json parses and the weights files are whole (paths.check_hf_dir), before any load."""
    from mesh_megatron.paths import check_hf_dir

    check_hf_dir(model_dir, "--model-dir", "pass a directory written by tools/convert_to_hf.py")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def task_manager(include_path: Optional[Sequence[str]] = None):
    """lm-eval's TaskManager over its own tasks and `include_path`, built once per process and
    path list: building it indexes every task YAML lm-eval ships (~15 s on a 2-core CPU), and
    one eval_lm.py run asks for it up to three times (suite check, suite run, --tasks)."""
    return _task_manager(tuple(include_path or ()))


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) if include_path else None)


def run_lm_eval(model_dir: str, tasks: Sequence[str], *, num_fewshot: Optional[int] = None,
                batch_size: int | str = 1, limit: Optional[float] = None,
                include_path: Optional[Sequence[str]] = None, dtype: str = "fp32",
                device: Optional[str] = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate with the `hf` model on `model_dir`; its result dict."""
    check_model_dir(model_dir)
    import lm_eval

    manager = task_manager(include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]  # names or glob patterns
    if unknown:
        raise ConfigError(f"--tasks {', '.join(unknown)}: unknown to lm-eval"
                          + (f" and --include-path {', '.join(include_path)}" if include_path else "")
                          + ": check the names (lm-eval ls tasks) or the task YAML directory")
    device = device or default_device()
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": model_dir, "trust_remote_code": True, "dtype": _lm_eval_dtype(dtype)},
        tasks=list(tasks), num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
        task_manager=manager, log_samples=False, device=device,
    )
    if results is None:  # non-zero ranks of a distributed lm-eval run
        return {}
    return results


def _lm_eval_dtype(dtype: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]


def _data_tokenizer(model_dir: str, tokenizer_type: Optional[str], tokenizer_file: Optional[str]):
    """The megatron tokenizer the indexed dataset was built with (for EOD and vocab checks)."""
    from mesh_megatron.data.tokenizer import build_tokenizer

    if tokenizer_file:
        kind, path = tokenizer_type or "sentencepiece", tokenizer_file
    else:
        found = find_tokenizer(model_dir)
        if found is None:
            raise ConfigError(f"--model-dir {model_dir} holds no tokenizer.model / tokenizer.json: pass "
                              "--tokenizer-type and --tokenizer-model")
        kind, path = found
    try:
        return build_tokenizer(kind, path)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None


@torch.no_grad()
def perplexity(model_dir: str, data_path: Sequence[str], *, split: str = "969,30,1", which: str = "valid",
               samples: int = 64, seq_length: Optional[int] = None, batch_size: int = 8, seed: int = 1234,
               tokenizer_type: Optional[str] = None, tokenizer_file: Optional[str] = None,
               cache_dir: Optional[str] = None, dtype: str = "fp32", device: Optional[str] = None,
               num_loops: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """exp(mean token NLL) of the HF model over the first `samples` samples of one split.

    Samples are megatron-core GPTDataset samples (`build_gpt_datasets`, same seed and split
    as training), so the number is comparable with the training log's validation loss.
    `num_loops` (a depth sweep): the model loaded once and run at each loop count N on the same
    samples; the result then holds `depths`, one {num_loops, loss, perplexity} per N.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from mesh_megatron.data.datasets import build_gpt_datasets
    from mesh_megatron.data.sampler import collate

    check_model_dir(model_dir)
    if which not in SPLITS:
        raise ConfigError(f"--perplexity-split {which!r}: choose one of {', '.join(SPLITS)}")
    if samples < 1:
        raise ConfigError("--perplexity-samples must be >= 1")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    seq_length = seq_length or config.max_position_embeddings
    tokenizer = _data_tokenizer(model_dir, tokenizer_type, tokenizer_file)
    counts = {"train": 1, "valid": 0, "test": 0, which: samples}
    try:
        built = build_gpt_datasets(
            list(data_path), split, seq_length, seed, train_samples=max(1, counts["train"]),
            valid_samples=counts["valid"], test_samples=counts["test"], tokenizer=tokenizer,
            cache_dir=cache_dir, padded_vocab_size=config.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    dataset = getattr(built, which)
    if dataset is None:
        raise ConfigError(f"split {split!r} gives the {which} split no documents: pick another "
                          "--perplexity-split or --split")

    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                 dtype=TORCH_DTYPES[dtype]).to(device).eval()
    if num_loops is not None and getattr(config, "model_type", None) != "mesh_gpt_neox":
        raise ConfigError(f"--num-loops needs a looped export (mesh_gpt_neox); {model_dir} is "
                          f"{getattr(config, 'model_type', '?')}, which has no loop")

    def measure(extra: dict) -> tuple[float, float]:
        total_nll, total_tokens = 0.0, 0.0
        for start in range(0, samples, batch_size):
            indices = [i % len(dataset) for i in range(start, min(samples, start + batch_size))]
            tokens, labels, mask = collate(dataset, indices)
            with torch.no_grad():
                logits = model(tokens.to(device), use_cache=False, **extra).logits.float()  # [b, s, vocab]
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(),
                                                    reduction="none")
            mask = mask.to(device).flatten()
            total_nll += float((nll * mask).sum())
            total_tokens += float(mask.sum())
        return total_nll / max(total_tokens, 1.0), total_tokens

    try:
        loss, total_tokens = measure({})
        depths = [dict(zip(("num_loops", "loss"), (n, measure({"num_loops": n})[0]))) for n in num_loops or []]
    except ValueError as e:  # a depth the model cannot run (weights per step): one line
        raise ConfigError(f"--num-loops: {e}") from None
    for d in depths:
        d["perplexity"] = math.exp(min(d["loss"], 50.0))
    out = {"split": which, "samples": samples, "seq_length": seq_length, "tokens": int(total_tokens),
           "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if num_loops is not None:
        out["trained_num_loops"] = config.num_loops
        out["depths"] = depths
    return out


def plot_depth_sweep(result: dict[str, Any], path: str, title: str = "") -> str:
    """Perplexity against inference depth (num_loops), the trained K marked; written atomically."""
    from matplotlib.figure import Figure

    from mesh_megatron.analysis.plots import _save

    depths = result["depths"]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot([d["num_loops"] for d in depths], [d["perplexity"] for d in depths], marker="o")
    ax.axvline(result["trained_num_loops"], color="grey", linestyle="--", label=f"trained K = {result['trained_num_loops']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loop iterations at inference (num_loops)")
    ax.set_ylabel(f"perplexity ({result['split']})")
    ax.set_title(title or "depth sweep")
    ax.legend()
    return _save(fig, path)


# ------------------------------------------------------------------ the paper's protocol
# docs/MESH_METHOD.md section 5: Pile validation perplexity; 0-shot average accuracy over
# nine lm-eval tasks. Wikitext and LAMBADA perplexities come from the same lm-eval run.
PAPER_ZERO_SHOT = ("lambada_openai", "lambada_standard", "hellaswag", "piqa", "winogrande",
                   "arc_easy", "arc_challenge", "sciq", "mmlu_continuation")
PAPER_PERPLEXITY_TASKS = ("wikitext",)  # + lambada_openai / lambada_standard's own perplexity
PILE_SPLIT = "1,0,0"  # --pile-data holds the Pile *validation* documents only: all of it is read


def unavailable_tasks(tasks: Sequence[str], include_path: Optional[Sequence[str]] = None) -> dict[str, str]:
    """{task: why} for the tasks whose data cannot be loaded here (offline: not in the Hugging
    Face cache and no local task YAML). Loading is lm-eval's own, so what passes here runs."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(include_path)
    missing = {}
    for task in tasks:
        if not manager.match_tasks([task]):
            missing[task] = "unknown to lm-eval"
            continue
        try:
            get_task_dict([task], manager)
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, its own types...
            missing[task] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return missing


def check_paper_suite(model_dir: str, pile_data: Optional[Sequence[str]], include_path=None,
                      skip_unavailable: bool = False) -> tuple[list[str], list[str]]:
    """(lm-eval tasks to run, what is skipped), or ConfigError with one line naming every
    missing piece and the fix, before the model is loaded."""
    check_model_dir(model_dir)
    tasks = [*PAPER_ZERO_SHOT, *PAPER_PERPLEXITY_TASKS]
    missing = unavailable_tasks(tasks, include_path)
    skipped = [f"{t} ({why})" for t, why in missing.items()]
    if not pile_data:
        skipped.insert(0, "pile (no --pile-data)")
    if skipped and not skip_unavailable:
        raise ConfigError(
            f"--suite paper: data not available for {len(skipped)} of {len(tasks) + 1} evaluations: "
            + "; ".join(skipped) + ". Fix: pass --pile-data PREFIX (the Pile validation set, "
            "tools/preprocess_data.py with the model's tokenizer), fetch the lm-eval datasets into the "
            "Hugging Face cache once online (or --include-path with local task YAMLs), or --skip-unavailable")
    return [t for t in tasks if t not in missing], skipped


def paper_summary(lm_results: dict[str, Any], pile: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The paper's numbers from lm-eval's result dict: perplexities and 0-shot accuracies."""
    res = (lm_results or {}).get("results", {})

    def metric(task: str, name: str) -> Optional[float]:
        value = res.get(task, {}).get(f"{name},none")
        return float(value) if isinstance(value, (int, float)) else None

    acc = {t: metric(t, "acc") for t in PAPER_ZERO_SHOT if metric(t, "acc") is not None}
    out: dict[str, Any] = {
        "pile_perplexity": pile["perplexity"] if pile else None,
        "wikitext_word_perplexity": metric("wikitext", "word_perplexity"),
        "lambada_openai_perplexity": metric("lambada_openai", "perplexity"),
        "lambada_standard_perplexity": metric("lambada_standard", "perplexity"),
        "zero_shot_acc": acc,
        "acc_norm": {t: v for t in PAPER_ZERO_SHOT if (v := metric(t, "acc_norm")) is not None},
        # Average over the tasks that ran; the paper's number needs all nine.
        "zero_shot_avg_acc": sum(acc.values()) / len(acc) if acc else None,
        "zero_shot_tasks_run": len(acc),
    }
    return out
