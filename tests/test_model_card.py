"""gradsense.model_card: the probe-fact sample and the per-domain accuracy table."""

import numpy as np
import pandas as pd
import pytest

from gradsense.errors import GradsenseError
from gradsense.model_card import fact_accuracy, probe_facts


def _write_facts(folder, rows):
    (folder / "facts").mkdir(parents=True)
    pd.DataFrame(rows, columns=["domain", "prompt", "right", "wrong"]).to_csv(
        folder / "facts" / "probe_facts.csv", index=False
    )


def test_probe_facts_take_an_even_share_of_each_domain_in_file_order(tmp_path, monkeypatch):
    rows = [("geo", f"g{i}", "a", "b") for i in range(4)] + [("bio", f"b{i}", "a", "b") for i in range(3)]
    _write_facts(tmp_path, rows)
    monkeypatch.setenv("GRADSENSE_DATA", str(tmp_path))
    # 3 facts over 2 domains: ceil(3 / 2) = 2 per domain, the first two of each, in the file's order.
    assert probe_facts(3)["prompt"].tolist() == ["g0", "g1", "b0", "b1"]
    assert len(probe_facts(None)) == 7


def test_probe_facts_name_a_missing_file_or_column(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSENSE_DATA", str(tmp_path))
    with pytest.raises(GradsenseError, match="probe_facts.csv are missing"):
        probe_facts(4)
    (tmp_path / "facts").mkdir()
    pd.DataFrame({"domain": ["x"], "prompt": ["p"]}).to_csv(tmp_path / "facts" / "probe_facts.csv", index=False)
    with pytest.raises(GradsenseError, match=r"lack columns \['right', 'wrong'\]"):
        probe_facts(4)


def test_fact_accuracy_by_hand():
    answers = pd.DataFrame(
        {
            "domain": ["geo", "geo", "geo", "bio"],
            "prompt": ["a", "b", "c", "d"],
            "greedy_right": [True, False, False, True],
            "right_beats_wrong": [True, True, False, False],
            "p_right": [0.9, 0.1, 0.3, 0.5],
        }
    )
    table = fact_accuracy(answers).set_index("domain")
    assert table.index.tolist() == ["bio", "geo"]
    assert table.loc["geo", "n"] == 3 and table.loc["bio", "n"] == 1
    np.testing.assert_allclose(
        table.loc["geo", ["greedy_right", "right_beats_wrong", "median_p_right"]], [1 / 3, 2 / 3, 0.3]
    )
