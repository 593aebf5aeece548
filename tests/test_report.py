"""gradsense.report and gradsense.stats: output files and bootstrap intervals."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gradsense.report import save_figure, save_json, save_table  # noqa: E402
from gradsense.stats import bootstrap_ci  # noqa: E402


def test_table_and_figure_files_are_deterministic(tmp_path):
    df = pd.DataFrame({"domain": ["a_b", "c"], "rate": [0.5, 0.25]})
    save_table(df, tmp_path, "t")
    assert pd.read_csv(tmp_path / "t.csv").equals(df)
    assert "\\toprule" in (tmp_path / "t.tex").read_text() and "a\\_b" in (tmp_path / "t.tex").read_text()
    blobs = []
    for run in range(2):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        save_figure(fig, tmp_path / str(run), "f")
        plt.close(fig)
        blobs.append(((tmp_path / str(run) / "f.png").read_bytes(), (tmp_path / str(run) / "f.pdf").read_bytes()))
    assert blobs[0] == blobs[1]
    save_json({"b": 1, "a": np.float32(0.5)}, tmp_path / "x" / "r.json")
    assert (tmp_path / "x" / "r.json").read_text().startswith('{\n  "a": 0.5')


def test_bootstrap_ci_brackets_the_estimate():
    values = np.r_[np.ones(30), np.zeros(70)]
    estimate, low, high = bootstrap_ci(values, n_boot=500)
    assert estimate == 0.3 and low < 0.3 < high and 0.15 < low and high < 0.45
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    assert np.isnan(bootstrap_ci(np.array([]))[0])
