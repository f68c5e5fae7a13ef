"""tools/ablate.py's report on synthetic runs: mean +- sd over seeds, paired differences,
the crossover statement with each of its branches, the ordering, and one record per
(variant, seed, budget) holding the run's own validation loss. (The end-to-end --quick run is
tests/distributed/test_ablate.py.)"""

import argparse
import os
import sys

import pytest

from launch import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import ablate  # noqa: E402

STEPS = {256: 2, 512: 4, 1024: 8}  # budget tokens -> steps at 128 tokens per step
EVALS = {  # (variant, seed) -> {step: valid loss}; mesh - base per seed in the comments
    ("base", 1234): {2: 5.0, 4: 4.0, 8: 3.0},
    ("mesh", 1234): {2: 5.2, 4: 3.9, 8: 3.15},  # +0.2, -0.1, +0.15
    ("base", 1235): {2: 5.1, 4: 4.2, 8: 3.1},
    ("mesh", 1235): {2: 5.3, 4: 3.9, 8: 3.05},  # +0.2, -0.3, -0.05
}


def runs(evals):
    # as train_one returns them: done.json's evals have string keys
    return [{"variant": v, "seed": s, "evals": {str(k): x for k, x in e.items()}} for (v, s), e in evals.items()]


def test_two_seeds_spread_crossover_and_its_caveats():
    args = argparse.Namespace(variants=["base", "mesh"])
    records, md = ablate.summarize(args, runs(EVALS), STEPS, 128)
    assert sorted((r["variant"], r["seed"], r["tokens"], r["iteration"], r["valid_loss"]) for r in records) == sorted(
        (v, s, 128 * n, n, e[n]) for (v, s), e in EVALS.items() for n in STEPS.values())
    lines = md.splitlines()
    assert "| tokens | base | mesh | mesh - base |" in lines
    assert "| 256 | 5.0500 ± 0.0707 | 5.2500 ± 0.0707 | +0.2000 ± 0.0000 |" in lines
    assert "| 512 | 4.1000 ± 0.1414 | 3.9000 ± 0.0000 | -0.2000 ± 0.1414 |" in lines
    assert "| 1,024 | 3.0500 ± 0.0707 | 3.1000 ± 0.0707 | +0.0500 ± 0.1414 |" in lines
    # ahead first at 512 (mean -0.2), behind again at 1,024, where the mean (0.05) is inside one sd
    assert ("**Crossover:** mesh first beats base (mean over seeds) at 512 training tokens. It does not stay "
            "ahead: base is lower again at 1,024. |mesh - base| is within one sd of the seeds at 1,024 tokens."
            ) in lines
    assert "**Ordering at the largest budget** (lower is better): base (3.0500) < mesh (3.1000)." in lines


def test_one_seed_without_crossover_has_no_spread():
    args = argparse.Namespace(variants=["base", "mesh"])
    one = {k: v for k, v in EVALS.items() if k[1] == 1234}
    one[("mesh", 1234)] = {2: 5.2, 4: 4.1, 8: 3.15}  # never below base
    _, md = ablate.summarize(args, runs(one), STEPS, 128)
    lines = md.splitlines()
    assert "| 512 | 4.0000 | 4.1000 | +0.1000 |" in lines and "±" not in "".join(lines[4:9])
    assert "**Crossover:** mesh does not beat base: not within the budgets run." in lines


@pytest.mark.parametrize("variants", [["base", "anchor"], ["anchor", "vanilla"]])
def test_without_mesh_and_base_nothing_is_compared_for_mesh(variants):
    evals = {(v, s): e for (_, s), e in EVALS.items() for v in variants}
    _, md = ablate.summarize(argparse.Namespace(variants=variants), runs(evals), STEPS, 128)
    assert "**Crossover:** mesh vs base: not compared (both variants are needed)." in md.splitlines()


def test_compare_pairs_each_arm_with_base_at_its_own_lr(tmp_path):
    """`ablate.py compare DIR...`: an arm run later in its own --out (its own --lr flag) is
    paired with the base of the same peak LR from another directory, per seed; a directory of
    another model is refused with one line."""
    import json

    def write(name, lr, evals, arms=None):
        evals = {k: {n: e.get(n, 9.0) for n in STEPS.values()} for k, e in evals.items()}  # every budget
        variants = list(dict.fromkeys(v for v, _ in evals))
        records, _ = ablate.summarize(argparse.Namespace(variants=variants), runs(evals), STEPS, 128)
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "variants": variants, "arms": arms or {}, "records": records,
            "tokens_per_step": 128, "budgets": {str(k): v for k, v in STEPS.items()},
            "recipe": {"model": {"preset": "tiny"}, "training": {"lr": lr}}}))
        return str(d)

    main = write("lr3", 3e-3, EVALS)
    later = write("rinit", 3e-3, {("mesh-rinit", 1234): {8: 3.1}, ("mesh-rinit", 1235): {8: 3.0}},
                  {"mesh-rinit": {"variant": "mesh", "flags": ["--mesh-router-init", "base"]}})
    low = write("lr1", 1e-3, {("base", 1234): {8: 3.4}, ("mesh", 1234): {8: 3.5}})
    table = ablate.compare([main, later, low])
    rows = {tuple(line.split(" | ")[:2]): line for line in table.splitlines() if "tmp" in line}
    row = lambda d, arm: rows[(f"| {d}", arm)]  # noqa: E731
    assert "+0.0500 ± 0.1414 (seeds 1234, 1235)" in row(main, "mesh")  # +0.15, -0.05
    assert "+0.0000 ± 0.1414 (seeds 1234, 1235)" in row(later, "mesh-rinit (`--mesh-router-init base`)")  # +0.1, -0.1 vs lr3
    assert row(low, "mesh").endswith("| 0.001 | 1234 | 3.5000 | +0.1000 (seeds 1234) |")  # its own base, not lr3's
    assert "1,024 tokens" in table.splitlines()[0]
    with pytest.raises(Exception, match="each have a base arm at lr 0.003"):
        ablate.compare([later, main, write("again", 3e-3, EVALS)])
    other = write("other", 3e-3, EVALS)
    data = json.loads(open(os.path.join(other, "results.json")).read())
    data["recipe"]["model"]["hidden_size"] = 128
    open(os.path.join(other, "results.json"), "w").write(json.dumps(data))
    with pytest.raises(Exception, match="another model, batch or budget list"):
        ablate.compare([main, other])
