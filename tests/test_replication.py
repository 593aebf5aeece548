"""gradsense.replication: a replication's params from the main ones, and the side-by-side table of the models."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from gradsense import GradsenseError
from gradsense import replication as rp
from gradsense.paper import HEADLINE_COLUMNS, evaluate_headline

ROOT = Path(__file__).resolve().parents[1]
MAIN = {
    "seed": 0,
    "model": {"name": None, "device": "auto"},
    "corrections": {"per_domain": 150, "batch_size": 32},
    "train": {"epochs": 3, "lr": 0.002},
    "evaluate": {"max_items": 160},
    "runs": {"seed_1": {"role": "seed", "seed": 1}},
    "replication": {"qwen": {"model": "qwen-x", "overrides": {"corrections": {"per_domain": 40}, "train": {}}}},
}


def test_a_replication_is_the_main_params_with_its_model_and_sizes():
    params = rp.replication_params(MAIN, "qwen")
    assert params["model"] == {"name": "qwen-x", "device": "auto"}  # the device setting is kept
    assert params["corrections"] == {"per_domain": 40, "batch_size": 32}
    assert params["train"] == MAIN["train"] and params["evaluate"] == MAIN["evaluate"]
    assert params["runs"] == {} and params["replication"] == {}  # it trains no variants and nests no replication
    assert MAIN["corrections"]["per_domain"] == 150  # the main params are not changed


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"model": "m", "overrides": {"corrections": {"per_domian": 1}}}, r"replication.qwen.corrections: unknown"),
        ({"model": "m", "overrides": {"controls": {"max_items": 1}}}, r"not stages it runs"),
        ({"overrides": {}}, "no model"),
        ({"model": "m", "sizes": {}}, r"unknown keys \['sizes'\]"),
    ],
)
def test_a_bad_entry_is_a_one_line_error_naming_it(entry, message):
    with pytest.raises(GradsenseError, match=message) as error:
        rp.replication_params({**MAIN, "replication": {"qwen": entry}}, "qwen")
    assert "\n" not in str(error.value)


def test_an_unknown_replication_names_the_ones_there_are():
    with pytest.raises(GradsenseError, match=r"no replication 'llama'.*have: qwen"):
        rp.replication_params(MAIN, "llama")


@pytest.mark.parametrize("preset", ["params.yaml", "params-ci.yaml", "params-gpu.yaml"])
def test_every_preset_s_replications_resolve(preset):
    params = yaml.safe_load((ROOT / preset).read_text())
    assert params["replication"], preset  # every preset replicates on the second family
    for key in params["replication"]:
        resolved = rp.replication_params(params, key)
        assert resolved["model"]["name"] != params["model"]["name"]
        assert set(resolved) == set(params)


def _headline(scale: float) -> pd.DataFrame:
    rows = []
    for part, set_name, metric, who in rp.ROWS:
        who = f"{who} (block 22)" if who.startswith("Backward") else who
        rows.append({"part": part, "set": set_name, "metric": metric, "who": who, "estimate": scale, "n": 10})
    rows.append({"part": "reading", "set": "test subjects", "metric": "answer recall", "who": "no injection"})
    return pd.DataFrame(rows).reindex(columns=HEADLINE_COLUMNS).assign(low=scale / 2, high=min(1.0, scale * 1.5))


def test_the_table_has_every_row_for_every_model_side_by_side():
    table = rp.replication_table({"A": (_headline(0.8), 30), "B": (_headline(0.4), 24)})
    assert len(table) == 2 * len(rp.ROWS) and list(table.columns) == rp.COLUMNS
    assert table.groupby("model")["estimate"].first().to_dict() == {"A": 0.8, "B": 0.4}
    assert set(table.loc[table["model"] == "B", "blocks"]) == {24}
    assert set(table["who"]) == {who for *_, who in rp.ROWS}  # the lens row is named without its block
    wide = rp.formatted(table)
    assert list(wide.columns) == ["A", "B"] and len(wide) == len(rp.ROWS)
    assert wide.iloc[0]["B"] == "0.40 [0.20, 0.60] n=10"
    metrics = rp.replication_metrics(table)
    assert metrics["b"]["test_subjects_answer_recall_describer"] == 0.4


def test_a_model_missing_a_row_is_an_error_naming_it():
    headline = _headline(0.5)
    headline = headline[headline["set"] != "all pairs"]
    with pytest.raises(GradsenseError, match=r"B: the headline has no row all pairs / success"):
        rp.replication_table({"B": (headline, 24)})


def test_an_unfinished_replication_or_evaluate_folder_is_named(tmp_path):
    with pytest.raises(GradsenseError, match="not a finished replication"):
        rp.read_meta(tmp_path)
    with pytest.raises(GradsenseError, match="train stage of .* did not finish"):
        rp.checkpoint_blocks(tmp_path)
    with pytest.raises(GradsenseError, match="lacks the evaluate tables heldout, decoupling"):
        evaluate_headline(tmp_path)


def test_the_cli_names_an_unknown_replication_in_one_line(capsys):
    from gradsense.cli import main

    assert main(["replicate", "llama", "--root", str(ROOT), "--params", str(ROOT / "params-ci.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "gradsense: error: no replication 'llama' in params (have: qwen)"
    assert not (ROOT / "results" / "replication" / "llama").exists()
