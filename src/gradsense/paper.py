"""The paper's headline numbers, each read from an earlier stage's result table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gradsense.errors import GradsenseError
from gradsense.stats import BOOTSTRAP


def fact_answer_shares(answers: pd.DataFrame) -> dict[str, float]:
    """Shares of the model card's probe facts where the right answer beats a wrong one, and where greedy decoding
    says it (`fact_answers` table)."""
    if answers.empty:
        raise GradsenseError("the model card's fact_answers table is empty")
    return {
        "right_beats_wrong": float(answers["right_beats_wrong"].mean()),
        "greedy_right": float(answers["greedy_right"].mean()),
    }


def prefers_right_share(corrections: pd.DataFrame) -> float:
    """Share of facts whose right answer the model already prefers (its belief on the "correct" rows)."""
    correct = corrections.loc[corrections["direction"] == "correct", "model_prefers_target"]
    if correct.empty:
        raise GradsenseError("the corrections table has no 'correct' rows")
    return float(correct.mean())


def best_gradient_probe(probe: pd.DataFrame) -> pd.Series:
    """The domain probe's best row on gradient features (highest accuracy)."""
    rows = probe[probe["features"] == "gradient"]
    if rows.empty:
        raise GradsenseError("the domain probe table has no rows on gradient features")
    return rows.sort_values("accuracy").iloc[-1]


HEADLINE_COLUMNS = ["part", "set", "metric", "who", "estimate", "low", "high", "n", "n_clusters", "ci"]


def headline_table(
    heldout: pd.DataFrame, decoupling: pd.DataFrame, baselines: pd.DataFrame, roundtrip: pd.DataFrame
) -> pd.DataFrame:
    """The evaluate stage's headline in one long table: per evaluation set, the describer's domain accuracy, answer
    recall and 'from' recall beside no injection and every baseline on the same items; the decoupling rates (all
    pairs, the seed's case, the external sets); the round-trip cosines. Columns HEADLINE_COLUMNS."""
    need = {"heldout": heldout, "decoupling": decoupling, "baselines": baselines, "roundtrip": roundtrip}
    for name, frame in need.items():
        if frame.empty:
            raise GradsenseError(f"the evaluate stage's {name} table is empty")
    reads = ["domain accuracy", "answer recall", "'from' recall"]
    main = heldout[heldout["metric"].isin(reads) & heldout["control"].isin(["gradient", "none"])]
    main = main[~main["set"].str.contains(": ")]  # the sets themselves, not their splits
    parts = [
        main.assign(part="reading", who=main["control"].map({"gradient": "describer", "none": "no injection"})),
        baselines[baselines["baseline"] != "describer"].assign(part="reading", who=lambda f: f["baseline"]),
        decoupling.assign(part="decoupling", set=decoupling["pairs"], who="describer"),
        roundtrip.rename(columns={"mean cosine": "estimate"}).assign(
            part="round trip", metric=lambda f: "cosine with: " + f["gradient of"], who="describer"
        ),
    ]
    table = pd.concat([p.reindex(columns=HEADLINE_COLUMNS) for p in parts], ignore_index=True)
    rows_only = table["ci"].isna()  # tables whose rows were resampled one by one (each row its own unit)
    table["ci"] = table["ci"].astype(object).where(~rows_only, BOOTSTRAP)
    table["n_clusters"] = table["n_clusters"].where(~rows_only, table["n"])
    order = {"describer": 0, "no injection": 1}
    return table.sort_values(
        ["part", "set", "metric", "who"], key=lambda c: c.map(order).fillna(2) if c.name == "who" else c, kind="stable"
    ).reset_index(drop=True)


EVALUATE_TABLES = ("heldout", "decoupling", "baselines", "roundtrip")  # what headline_table reads


def evaluate_headline(folder: str | Path) -> pd.DataFrame:
    """`headline_table` of an evaluate stage's output folder (the main one, or a replication's)."""
    folder = Path(folder)
    missing = [n for n in EVALUATE_TABLES if not (folder / f"{n}.csv").is_file()]
    if missing:
        raise GradsenseError(f"{folder} lacks the evaluate tables {', '.join(missing)}: did its evaluate stage run?")
    return headline_table(*(pd.read_csv(folder / f"{n}.csv") for n in EVALUATE_TABLES))


# Which split (and which items) each evaluation set reads: the first rule whose key the set's name contains.
SPLITS = [
    ("seed case", "test split: history items, each in a biology evaluation passage"),
    ("external sets", "external facts (never trained or tuned on), each in an unseen passage of another domain"),
    ("external", "external facts: a third-party dataset or new phrasings, never trained or tuned on"),
    ("held-out templates", "test split: the held-out template of each trained domain"),
    ("held-out domain", "every split of the held-out domain"),
    ("test subjects", "test split: held-out subjects, trained templates and domains"),
    ("new phrasings", "external facts: new phrasings, never trained or tuned on"),
    ("all pairs", "test split items, each in an evaluation passage of another domain"),
]
METHODS_COLUMNS = ["section", "set", "metric", "who", "split", "n", "n_clusters", "unit", "seeds", "ci"]


def split_of(name: str) -> str:
    """The split (and items) an evaluation set's numbers come from, by its name."""
    for key, split in SPLITS:
        if key in name:
            return split
    raise GradsenseError(f"no split is known for the evaluation set {name!r}")


def methods_table(headline: pd.DataFrame, long: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """For every reported number of the headline, the main table and the held-out-domain rotation: its split, n
    (rows), the resampled unit and how many, the seeds and the CI method. Columns METHODS_COLUMNS."""
    decoupling_metrics = long["metric"].str.startswith("decoupling") | long["metric"].str.contains("passage")
    pooled = long["seeds"].fillna(1).astype(int)
    parts = [
        headline.assign(
            section="headline (seed 0)",
            split=headline["set"].map(split_of),
            unit=headline["part"].map({"decoupling": "passages"}).fillna("items"),
            seeds=1,
        ),
        long.assign(
            section="main table",
            set=long["group"] + ": " + long["condition"],
            who="describer",
            split="test split (held-out subjects; decoupling: evaluation passages)",
            unit=decoupling_metrics.map({True: "passages", False: "items"}),
            seeds=pooled,
        ),
        folds.assign(
            section="held-out-domain rotation",
            set="fold: " + folds["fold"],
            who="describer",
            split="every split of the fold's held-out domain",
            unit="items",
            seeds=1,
        ),
    ]
    return pd.concat([p[METHODS_COLUMNS] for p in parts], ignore_index=True)


ABLATION_METRICS = ("domain accuracy", "answer recall")  # per ablation in the metrics file


def slug(text: str) -> str:
    """A metric name as a DVC metrics key: lower case, words joined by underscores."""
    return "_".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def headline_metrics(long: pd.DataFrame, folds: pd.DataFrame, headline: pd.DataFrame) -> dict:
    """The paper's headline numbers as a flat, nested dict for `dvc metrics show/diff`: the pooled main result
    (estimate, low, high per core metric), the held-out-domain mean over folds, the describer's domain accuracy
    and answer recall on every evaluation set (seed 0), and every ablation's domain accuracy and answer recall (so a
    sweep over one variant's settings shows in `dvc exp show`)."""
    pooled = long[long["group"] == "main result"]
    if pooled.empty:
        raise GradsenseError("the main table has no main-result rows")
    interval = ["estimate", "low", "high"]
    rows = {slug(r.metric): {k: round(float(getattr(r, k)), 4) for k in interval} for r in pooled.itertuples()}
    mean = folds[folds["fold"] == "mean over folds"]
    fold_rows = {slug(r.metric): {k: round(float(getattr(r, k)), 4) for k in interval} for r in mean.itertuples()}
    reads = headline[(headline["part"] == "reading") & (headline["who"] == "describer")]
    sets: dict[str, dict] = {}
    for r in reads.itertuples():
        sets.setdefault(slug(r.set), {})[slug(r.metric)] = round(float(r.estimate), 4)
    ablations: dict[str, dict] = {}
    for r in long[(long["group"] == "ablation") & long["metric"].isin(ABLATION_METRICS)].itertuples():
        ablations.setdefault(slug(r.condition), {})[slug(r.metric)] = round(float(r.estimate), 4)
    return {"main_result": rows, "heldout_domain_folds": fold_rows, "sets_seed0": sets, "ablations": ablations}
