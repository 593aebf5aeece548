"""The main result pooled over the seeds that have run, before the ablations stage has (run by hand).

Usage: python scripts/pool_seeds.py
Reads the evaluate stage's scored items (seed `seed` of params.yaml) and every seed run of params.yaml's `runs:` that
has results under results/runs/, and prints the ablations notebook's seeds table (`main_table.seeds_table`: each seed,
then the pool, whose CIs cluster an item's rows over the seeds) — the numbers `results/ablations/seeds.csv` will hold
once `dvc repro` reaches the ablations stage. Seeds without results are named and left out.
"""

from __future__ import annotations

import pandas as pd

from gradsense import evaluate as ev
from gradsense import main_table as mt
from gradsense import runs as rn
from gradsense.errors import GradsenseError
from gradsense.paths import Paths
from gradsense.pipeline import read_params


def main() -> None:
    """Print the seeds table of the seeds that have results."""
    params, paths = read_params("params.yaml"), Paths(".")
    seed_runs = {
        f"seed {params['seed']}": (
            ev.main_test_rows(pd.read_csv(paths.descriptions)),
            pd.read_csv(paths.decoupling_items),
        )
    }
    for spec in rn.run_specs(params["runs"]).values():
        if spec.role != "seed":
            continue
        try:
            frames = rn.read_run(".", spec)
        except GradsenseError as error:
            print(f"left out: {error}")
            continue
        seed_runs[spec.label] = (frames["test"], frames["decoupled"])
    table = mt.seeds_table(seed_runs, params["ablations"]["n_boot"], params["seed"])
    columns = ["condition", "metric", "estimate", "low", "high", "n", *mt.SEED_COLUMNS]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[[c for c in columns if c in table]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
