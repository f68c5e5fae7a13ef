#!/usr/bin/env python
"""Evaluate an exported model (tools/convert_to_hf.py output): lm-evaluation-harness tasks
and/or perplexity on a split of an indexed dataset.

  python tools/eval_lm.py --model-dir hf/run1 --tasks lambada_openai,piqa --output results.json
  python tools/eval_lm.py --model-dir hf/run1 --perplexity-data data/pile_text_document --output ppl.json
  python tools/eval_lm.py --model-dir hf/run1 --tasks my_task --include-path my_tasks/ --offline
  python tools/eval_lm.py --model-dir hf/run1 --suite paper --pile-data data/pile_val_text_document --offline

--suite paper is the protocol of docs/MESH_METHOD.md section 5: Pile validation perplexity
(--pile-data, token level), Wikitext and LAMBADA perplexities, and 0-shot accuracy on
lambada_openai, lambada_standard, hellaswag, piqa, winogrande, arc_easy, arc_challenge, sciq,
mmlu_continuation (average of `acc`). Every piece's data is checked first: anything missing
stops with one line naming it (or is listed and skipped with --skip-unavailable).

Offline use: with --offline (or HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1) nothing is downloaded;
tasks whose datasets are in the Hugging Face cache, or that read local files
(`dataset_path: json` + `dataset_kwargs: {data_files: ...}` in a task YAML under
--include-path), still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="Hugging Face directory written by tools/convert_to_hf.py")
    p.add_argument("--suite", choices=["paper"], default=None,
                   help="a named protocol: 'paper' = Pile/Wikitext/LAMBADA perplexity + the nine 0-shot tasks")
    p.add_argument("--pile-data", nargs="+", default=None,
                   help="--suite paper: indexed dataset of the Pile validation documents (model's tokenizer)")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="--suite paper: run what has data, list the rest, instead of stopping")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task names or glob patterns (e.g. lambada_openai,piqa)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    p.add_argument("--batch-size", default="1", help="lm-eval batch size: an integer or 'auto'")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task: an integer count, or a fraction below 1 (for quick checks)")
    p.add_argument("--include-path", action="append", default=None,
                   help="directory of extra task YAMLs (repeatable)")
    p.add_argument("--output", default=None,
                   help="write all results (lm-eval's dict + perplexity) to this JSON (checked before any "
                        "evaluation; written whole)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")
    p.add_argument("--offline", action="store_true",
                   help="never touch the network (sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype to run the model in")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    ppl = p.add_argument_group("perplexity on an indexed dataset")
    ppl.add_argument("--perplexity-data", nargs="+", default=None,
                     help="indexed dataset prefix(es), as --data-path in training: [w1] prefix1 [w2] prefix2 ...")
    ppl.add_argument("--split", default="969,30,1", help="train,valid,test document shares (as in training)")
    ppl.add_argument("--perplexity-split", choices=["train", "valid", "test"], default="valid",
                     help="which split to measure")
    ppl.add_argument("--perplexity-samples", type=int, default=64, help="samples (sequences) to measure")
    ppl.add_argument("--seq-length", type=int, default=None,
                     help="tokens per sample (default: the model's max_position_embeddings)")
    ppl.add_argument("--perplexity-batch-size", type=int, default=8, help="sequences per forward pass")
    ppl.add_argument("--seed", type=int, default=1234, help="dataset shuffling seed (as in training)")
    ppl.add_argument("--num-loops", default=None,
                     help="depth sweep: comma-separated loop counts N (e.g. 1,2,4,8,16); perplexity at each, a "
                          "table and a plot (--plot)")
    ppl.add_argument("--plot", default=None,
                     help="--num-loops: the PNG to write (default: --output with _depth.png for .json)")
    ppl.add_argument("--tokenizer-type", choices=["sentencepiece", "hf"], default=None,
                     help="tokenizer the data was preprocessed with (default: the one in --model-dir)")
    ppl.add_argument("--tokenizer-model", default=None, help="its file (default: the one in --model-dir)")
    ppl.add_argument("--data-cache-dir", default=None, help="dataset index cache (default ~/.cache/mesh_megatron)")
    args = p.parse_args(argv)
    if not args.tasks and not args.perplexity_data and not args.suite:
        p.error("nothing to do: pass --suite paper, --tasks and/or --perplexity-data")
    return args


def run_paper(args, evaluation) -> dict:
    """docs/MESH_METHOD.md section 5 on the exported model; ConfigError if data is missing."""
    tasks, skipped = evaluation.check_paper_suite(args.model_dir, args.pile_data, args.include_path,
                                               args.skip_unavailable)
    for item in skipped:
        print(f"skipped: {item}")
    pile = None
    if args.pile_data:
        pile = evaluation.perplexity(args.model_dir, args.pile_data, split=evaluation.PILE_SPLIT, which="train",
                                  samples=args.perplexity_samples, seq_length=args.seq_length,
                                  batch_size=args.perplexity_batch_size, seed=args.seed,
                                  tokenizer_type=args.tokenizer_type, tokenizer_file=args.tokenizer_model,
                                  cache_dir=args.data_cache_dir, dtype=args.dtype, device=args.device)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    results = evaluation.run_lm_eval(args.model_dir, tasks, num_fewshot=0, batch_size=batch, limit=limit,
                                  include_path=args.include_path, dtype=args.dtype, device=args.device) if tasks else {}
    summary = evaluation.paper_summary(results, pile)
    summary["skipped"] = skipped
    for key in ("pile_perplexity", "wikitext_word_perplexity", "lambada_openai_perplexity",
                "lambada_standard_perplexity", "zero_shot_avg_acc"):
        value = summary[key]
        print(f"{key}: {value:.4f}" if value is not None else f"{key}: -")
    for task, acc in summary["zero_shot_acc"].items():
        print(f"  {task}: acc {acc:.4f}")
    return {"summary": summary, "lm_eval": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.offline:  # before datasets / huggingface_hub are imported
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    from mesh_megatron import evaluation
    from mesh_megatron.config import ConfigError
    from mesh_megatron.paths import atomic_file, check_output_file, fail

    out: dict = {"model_dir": args.model_dir}
    try:
        check_inputs(args, evaluation)
        if args.output:
            check_output_file(args.output, "--output", force=args.force)
        depths, plot = sweep_args(args)
        if plot:
            check_output_file(plot, "--plot", force=args.force)
        if args.suite == "paper":
            out["paper"] = run_paper(args, evaluation)
        if args.perplexity_data:
            out["perplexity"] = evaluation.perplexity(
                args.model_dir, args.perplexity_data, split=args.split, which=args.perplexity_split,
                samples=args.perplexity_samples, seq_length=args.seq_length,
                batch_size=args.perplexity_batch_size, seed=args.seed, tokenizer_type=args.tokenizer_type,
                tokenizer_file=args.tokenizer_model, cache_dir=args.data_cache_dir, dtype=args.dtype,
                device=args.device, num_loops=depths)
            ppl = out["perplexity"]
            print(f"perplexity ({ppl['split']}, {ppl['samples']} samples, {ppl['tokens']} tokens): "
                  f"{ppl['perplexity']:.4f} (loss {ppl['loss']:.4f})")
            if depths:
                print(f"depth sweep (trained K = {ppl['trained_num_loops']}):\n| num_loops | loss | perplexity |\n"
                      "|---:|---:|---:|\n" + "\n".join(f"| {d['num_loops']} | {d['loss']:.4f} | {d['perplexity']:.4f} |"
                                                   for d in ppl["depths"]))
                print(f"wrote {evaluation.plot_depth_sweep(ppl, plot, args.model_dir)}")
        if args.tasks:
            batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
            limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
            results = evaluation.run_lm_eval(
                args.model_dir, [t.strip() for t in args.tasks.split(",") if t.strip()],
                num_fewshot=args.num_fewshot, batch_size=batch, limit=limit,
                include_path=args.include_path, dtype=args.dtype, device=args.device)
            out["lm_eval"] = results
            if results:
                from lm_eval.utils import make_table

                print(make_table(results))
        if args.output:
            from lm_eval.utils import handle_non_serializable

            with atomic_file(args.output, "--output") as tmp, open(tmp, "w") as f:
                json.dump(out, f, indent=2, default=handle_non_serializable)
    except ConfigError as e:
        return fail(e)
    if args.output:
        print(f"wrote {args.output}")
    return 0


def sweep_args(args) -> tuple[list[int], str | None]:
    """(--num-loops as ints, the plot path), or one clear error."""
    from mesh_megatron.config import ConfigError

    if args.num_loops is None:
        if args.plot:
            raise ConfigError("--plot is the depth sweep's: add --num-loops N1,N2,...")
        return [], None
    if not args.perplexity_data:
        raise ConfigError("--num-loops sweeps perplexity: add --perplexity-data PREFIX")
    try:
        depths = [int(x) for x in args.num_loops.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--num-loops {args.num_loops!r}: pass comma-separated integers, e.g. 1,2,4,8,16") from None
    if not depths or min(depths) < 1:
        raise ConfigError(f"--num-loops {args.num_loops!r}: every loop count must be >= 1")
    plot = args.plot or (os.path.splitext(args.output)[0] + "_depth.png" if args.output else None)
    if plot is None:
        raise ConfigError("--num-loops writes a plot: pass --plot PATH.png (or --output, next to which it goes)")
    return depths, plot


def check_inputs(args, evaluation) -> None:
    """Every input named on the command line, before the model or any dataset is loaded:
    the model directory (config.json parses, weights files whole), the tokenizer file, the
    indexed datasets and task directories."""
    from mesh_megatron.config import ConfigError
    from mesh_megatron.data.datasets import parse_blend
    from mesh_megatron.data.validation import inspect_indexed_dataset
    from mesh_megatron.paths import check_input_dir, check_input_file

    evaluation.check_model_dir(args.model_dir)
    if args.tokenizer_model:
        check_input_file(args.tokenizer_model, "--tokenizer-model", "pass the tokenizer file the data was "
                         "preprocessed with")
    for flag, data in (("--perplexity-data", args.perplexity_data), ("--pile-data", args.pile_data)):
        for prefix in parse_blend(data)[0] if data else []:
            try:
                inspect_indexed_dataset(prefix)
            except ValueError as e:
                raise ConfigError(f"{flag}: {e}") from None
    for path in args.include_path or []:
        check_input_dir(path, "--include-path", "pass a directory of lm-eval task YAMLs")


if __name__ == "__main__":
    sys.exit(main())
