"""The main table, the controls table and rate rows, assembled from scored frames whose rates are known by hand."""

import numpy as np
import pandas as pd
import pytest

from gradsense import controls as ct
from gradsense import main_table as mt
from gradsense.errors import GradsenseError
from gradsense.stats import rate_rows


def scored(domain_ok, answer_ok=None, pressure=None, direction=None) -> pd.DataFrame:
    """A scored test frame with the main table's columns."""
    n = len(domain_ok)
    return pd.DataFrame(
        {
            "id": [f"i{k}" for k in range(n)],
            "domain_ok": domain_ok,
            "answer_ok": answer_ok if answer_ok is not None else [False] * n,
            "from_ok": [True] * n,
            "pressure": pressure if pressure is not None else [True] * n,
            "direction": direction if direction is not None else ["correct"] * n,
        }
    )


def decoupled(success, leakage=None, ids=None) -> pd.DataFrame:
    """A scored decoupling frame."""
    n = len(success)
    return pd.DataFrame(
        {
            "id": ids if ids is not None else [f"i{k}" for k in range(n)],
            "success": success,
            "leakage": leakage if leakage is not None else [False] * n,
            "answer_ok": [False] * n,
            "to_from_passage": [False] * n,
        }
    )


def estimates(rows) -> dict:
    """{(condition, metric): estimate} of rate rows."""
    frame = pd.DataFrame(rows)
    return dict(zip(zip(frame["condition"], frame["metric"]), frame["estimate"]))


def test_rate_rows_carry_keys_n_and_a_ci_around_the_estimate():
    rows = rate_rows({"a": [1, 0, 0, 1], "b": [True, True]}, n_boot=50, group="g")
    assert [(r["metric"], r["estimate"], r["n"], r["group"]) for r in rows] == [("a", 0.5, 4, "g"), ("b", 1.0, 2, "g")]
    assert rows[0]["low"] < 0.5 < rows[0]["high"]
    assert rows[1]["high"] == 1.0 and rows[1]["low"] < 0.5 and rows[1]["ci"].startswith("Wilson")  # 2 of 2 is no proof


def test_core_rates_use_test_and_decoupling_parts():
    rows = mt.core_rates(scored([True, False, True, True]), decoupled([True, False]), n_boot=20, condition="x")
    got = estimates(rows)
    assert list(pd.DataFrame(rows)["metric"]) == [*mt.CORE_TEST, *mt.CORE_DECOUPLING]
    assert got[("x", "domain accuracy")] == 0.75 and got[("x", "answer recall")] == 0.0
    assert got[("x", "decoupling success")] == 0.5 and got[("x", "decoupling leakage")] == 0.0
    only_test = mt.core_rates(scored([True]), decoupled([]), n_boot=20, condition="x")
    assert [r["metric"] for r in only_test] == list(mt.CORE_TEST)  # an empty part gives no rows
    assert mt.core_rates(None, None) == []


def test_seeds_table_pools_rows_not_rates_and_spread_excludes_the_pool():
    seed_runs = {
        "seed 0": (scored([True, True, True, True]), decoupled([True])),
        "seed 1": (scored([False, False]), decoupled([False, False, False])),
    }
    table = mt.seeds_table(seed_runs, n_boot=20)
    got = estimates(table.to_dict("records"))
    pooled = mt.pooled_condition(2)
    assert got[(pooled, "domain accuracy")] == 4 / 6  # 6 (item, seed) rows, not the mean of 1.0 and 0.0
    assert got[(pooled, "decoupling success")] == 1 / 4
    assert set(table["group"]) == {mt.MAIN_RESULT}
    spread = mt.seed_spread(table)
    assert spread.loc["domain accuracy", "mean"] == 0.5 and spread.loc["domain accuracy", "min"] == 0.0
    assert spread.loc["domain accuracy", "std"] == pytest.approx(np.sqrt(0.5))  # sample std of (1, 0)


def test_direction_rows_split_by_the_items_direction():
    items = pd.DataFrame({"id": ["i0", "i1", "i2"], "direction": ["correct", "counterfactual", "correct"]})
    test = scored([True, False, False], direction=["correct", "counterfactual", "correct"])
    pairs = decoupled([True, True, False], ids=["i0", "i1", "i2"])
    got = estimates(mt.direction_rows(test, pairs, items, n_boot=20))
    assert got[("correcting an error (seeds pooled)", "domain accuracy")] == 0.5
    assert got[("pushing a counterfactual (seeds pooled)", "domain accuracy")] == 0.0
    assert got[("correcting an error (seeds pooled)", "decoupling success")] == 0.5
    assert got[("pushing a counterfactual (seeds pooled)", "decoupling success")] == 1.0


def test_main_table_long_and_wide():
    seeds = mt.seeds_table({"seed 0": (scored([True, True]), decoupled([True]))}, n_boot=20)
    controls = pd.DataFrame(ct.controls_table({}, [0, 0, 1, 3], ["a", "b"], ["a", "a"], n_boot=20))
    extra = pd.DataFrame(rate_rows({"head parsed": [1]}, 20, condition="z", group="g"))  # not a core metric
    long = mt.main_table_long(seeds, controls, extra)
    assert list(long.columns) == mt.COLUMNS and "head parsed" not in set(long["metric"])
    assert list(dict.fromkeys(long["condition"])) == [mt.pooled_condition(1), ct.BACKWARD_LENS, ct.LINEAR_PROBE]
    wide = mt.main_table(long)
    assert list(wide.columns) == ["group", "condition", *mt.CORE_TEST, *mt.CORE_DECOUPLING]
    lens = wide.set_index("condition").loc[ct.BACKWARD_LENS]
    assert lens["domain accuracy"] == "n/a" and lens["answer recall"].startswith("0.50 [")
    cell = wide.set_index("condition").loc[mt.pooled_condition(1), "domain accuracy"]
    assert cell.startswith("1.00 [") and cell.endswith(", 1.00]") and cell != "1.00 [1.00, 1.00]"  # Wilson at 1
    assert mt.main_result(long).loc["decoupling success", "estimate"] == 1.0


def test_run_rows_and_per_item_table():
    runs = {("ablation", "a"): (scored([True, False]), decoupled([True])), ("transfer", "b"): (scored([True]), None)}
    got = estimates(mt.run_rows(runs, n_boot=20))
    assert got[("a", "domain accuracy")] == 0.5 and got[("b", "domain accuracy")] == 1.0
    assert ("b", "decoupling success") not in got
    stacked = mt.per_item_table(runs, ["group", "condition"])
    assert list(zip(stacked["group"], stacked["part"])) == [
        ("ablation", "test"),
        ("ablation", "test"),
        ("ablation", "decoupling"),
        ("transfer", "test"),
    ]
    assert mt.per_item_table({"c": (scored([True]), None)}, ["condition"])["condition"].tolist() == ["c"]


def test_text_only_passages_state_the_fact_after_labelled_examples():
    train = pd.DataFrame(
        {
            "domain": ["a", "a", "b"],
            "prompt": ["A0 is", "A1 is", "B0 is"],
            "target": [" x", " y", " z"],
            "label": ["domain: a | to: x\nsentence", "domain: a | to: y", "domain: b | to: z"],
        }
    )
    examples = ct.text_examples(train, per_domain=1, seed=0)
    assert sorted(examples["domain"]) == ["a", "b"]
    passage = ct.text_only_passage(examples, "The capital of France is", " Paris")
    lines = passage.splitlines()
    assert lines[0] == ct.TEXT_ONLY_HEADER and lines[-1] == "Fact: The capital of France is Paris"
    assert len(lines) == 1 + 2 * 2 + 1 and "sentence" not in passage  # only each label's head line
    items = pd.DataFrame({"row": [7], "prompt": ["Q is"], "target": [" R"]})
    plan = ct.text_only_plan(examples, pd.DataFrame({"row": [7], "context": ["A passage."]}), items)
    assert plan["context"].iloc[0] == "A passage.\n\n" + ct.text_only_passage(examples, "Q is", " R")
    assert ct.text_only_contexts(examples, items) == [ct.text_only_passage(examples, "Q is", " R")]


def test_controls_table_rates_and_order():
    shuffled = pd.DataFrame(
        {
            "id": ["i0", "i1"],
            "domain_ok": [True, False],
            "answer_ok": [False, False],
            "from_ok": [False, False],
            "pressure": [True, True],
            "domain": ["a", "a"],
            "read_domain": ["a", "b"],
            "read_domain_ok": [False, True],
        }
    )
    runs = {ct.TRAINED: (scored([True, True]), decoupled([True, False])), ct.SHUFFLED: (shuffled, None)}
    table = ct.controls_table(runs, [0, 2, 0, 1], ["a", "b", "b"], ["a", "b", "a"], n_boot=20)
    got = estimates(table.to_dict("records"))
    assert list(dict.fromkeys(table["condition"])) == [ct.TRAINED, ct.SHUFFLED, ct.BACKWARD_LENS, ct.LINEAR_PROBE]
    assert got[(ct.SHUFFLED, "names the read item's domain")] == 1.0  # only the pair whose domains differ
    assert got[(ct.BACKWARD_LENS, "answer recall")] == 0.5 and got[(ct.LINEAR_PROBE, "domain accuracy")] == 2 / 3
    assert set(table["group"]) == {ct.GROUP}
    # every condition but the trained describer is a paired difference against it on the same items
    paired = table.dropna(subset=["difference"]).set_index(["condition", "metric"])
    assert paired.loc[(ct.SHUFFLED, "domain accuracy"), "difference"] == pytest.approx(-0.5)
    assert set(paired["vs"]) == {ct.TRAINED} and ct.TRAINED not in paired.index.get_level_values(0)
    with_ids = ct.controls_table(runs, [0, 2], ["a", "b"], ["a", "a"], 20, 0, ["i0", "i1"], ["i0", "i1"])
    lens = with_ids.set_index(["condition", "metric"]).loc[(ct.BACKWARD_LENS, "answer recall")]
    assert lens["difference"] == pytest.approx(0.5) and lens["n_paired"] == 2  # the describer named no answer
    with pytest.raises(GradsenseError, match="probe predictions"):
        ct.controls_table(runs, [0], ["a"], ["a", "b"])


def test_stored_condition_reads_back_a_condition_by_name():
    runs = {ct.TRAINED: (scored([True, False]), decoupled([True])), ct.STEERING: (scored([False]), decoupled([]))}
    per_item = mt.per_item_table(runs, ["condition"])
    test, pairs = ct.stored_condition(per_item, ct.TRAINED)
    assert test["domain_ok"].tolist() == [True, False] and pairs["success"].tolist() == [True]
    with pytest.raises(GradsenseError, match="no condition"):
        ct.stored_condition(per_item, ct.NOISE)


def test_paired_rates_compare_the_same_items_and_pairs():
    run = (scored([True, True, False, False]), decoupled([True, False, True]))
    ref = (scored([True, False, False, False]).iloc[::-1], decoupled([True, True, True]))  # any row order
    ref[1]["context"] = ["p1", "p1", "p2"]
    rows = pd.DataFrame(mt.paired_rates(run, ref, n_boot=50, condition="x")).set_index("metric")
    assert rows.loc["domain accuracy", "difference"] == pytest.approx(0.25)  # i1 right only in the run
    assert rows.loc["decoupling success", "difference"] == pytest.approx(-1 / 3)
    assert rows.loc["domain accuracy", "n_paired"] == 4 and rows.loc["decoupling success", "n_paired"] == 3
    lo, hi = rows.loc["domain accuracy", ["diff_low", "diff_high"]]
    assert lo <= 0.25 <= hi
    # only items both scored are paired; a part the reference lacks gives no rows
    partial = pd.DataFrame(mt.paired_rates((scored([True, True]), None), ref, n_boot=20)).set_index("metric")
    assert (
        partial.loc["domain accuracy", "difference"] == pytest.approx(0.5) and "decoupling success" not in partial.index
    )
    table = mt.paired_rows({("g", "x"): run}, {("g", "x"): "ref"}, {"ref": ref}, n_boot=20)
    long = mt.with_paired(pd.DataFrame(mt.core_rates(*run, n_boot=20, group="g", condition="x")), table)
    assert long.set_index("metric").loc["domain accuracy", "vs"] == "ref"
    wide = mt.paired_table(long.reindex(columns=mt.COLUMNS))
    assert wide.loc[0, "domain accuracy"].startswith("+0.25 [")


def test_pooled_seeds_cluster_an_items_rows_and_report_the_seed_spread():
    rng = np.random.default_rng(0)
    hits = rng.random(40) < 0.5
    one = scored(list(hits))
    runs = {f"seed {k}": (one, decoupled([True, False] * 5)) for k in range(3)}  # the same item rows 3 times
    seeds = mt.seeds_table(runs, n_boot=200)
    pooled = seeds[seeds["condition"] == mt.pooled_condition(3)].set_index("metric")
    single = seeds[seeds["condition"] == "seed 0"].set_index("metric")
    row = pooled.loc["domain accuracy"]
    assert row["n"] == 120 and row["n_clusters"] == 40 and row["ci"] == "percentile cluster bootstrap"
    # three copies of the same rows carry no more information than one: the interval is about as wide
    width = row["high"] - row["low"]
    assert width == pytest.approx(
        single.loc["domain accuracy", "high"] - single.loc["domain accuracy", "low"], abs=0.05
    )
    assert (
        row["seed_mean"] == pytest.approx(hits.mean())
        and row["seed_sd"] == pytest.approx(0, abs=1e-9)
        and row["seeds"] == 3
    )
