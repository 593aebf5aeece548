"""Can the describer learn to read a year from the gradient rather than recall it from the fact? Chosen on the
validation split (run once by hand; not a stage).

Usage: python scripts/select_years.py EPOCHS N [N ...] [--source B] [--digits D] [--control-share S [S ...]]
       [--seeds SEED ...]
N = counterfactual targets per training year (0 = none); B = the block the last-position slots read (default 22),
D = the block the target-position slots read (default B); S = share of each batch that is a noise or no-injection
control row (default 0.2); SEED: training seeds, one describer each (default 0). Every set is also scored with the
domain field read from a closed vocabulary (`forced_choice.closed_domains`: the domain names and `none`, and `none`
left out where the description names a `to` value).
Needs the pipeline's corrections, gradients and oracle outputs under results/. The describer of `select_read.py`'s
`both6` (four slots read the last prompt position, one slot each reads target positions 2 … 6: a bare space and four
digits) is trained on the train stage's items plus, for every training item whose target is a year, N copies whose
target is another year drawn at random (1000–2025, seeded; not its target, not its source). Each copy's gradient is
that of −log p(random year | prompt) and its label the item's head with `to` set to that year: a year then cannot be
recalled from the fact, only read from the gradient. Scored, as `select_read.py`, on 200 validation-split items (and
history, and years), on every validation-split year, on the same validation prompts with a random year as the target
(prompts never trained on: is the year read?), on history's own training items and, for the record only, on the
external new-phrasings set. The test split is never read.

Measured 2026-12-05 (2-core Intel Xeon with AMX, `select_years.py 3 4 0`; y4 against y0): validation 0.870 / 0.840
against 0.890 / 0.815; validation years 0 / 1 of 15 against 0 / 0; validation prompts with random years 1 / 0 of 15
against 0 / 0; history's 68 training years 0.06 / 0.25 against 0.03 / 0.00. The copies are fitted, not read.

**Digits read from block 29 (2026-12-06, 2-core AMD EPYC, `select_years.py 3 0 12 --source 26 --digits 29`, one
run, y12 against y0, domain / answer):** the four last-position slots read block 26 (the pipeline's source), the five
target-position slots block 29, where the Backward Lens reads a year's digits in place (0.67–0.78 against 0.25–0.40
at block 26). Validation (200) 0.885 / **0.890** against 0.905 / 0.870, unseen answers **11 / 28** against 3 / 28;
its 10 years **10 / 10** against 0 / 10; all 15 validation years **0.867** against 0.000; the validation prompts with
a random year as the target (no fact to recall) **14 / 15** against 0 / 15; history's training items 0.41 / 0.54
against 0.43 / 0.28; new phrasings 0.63 / 0.51 against 0.62 / 0.56 (its 8 years 5 / 8 against 0 / 8). The years are
read, not recalled. But every year row's domain is wrong: y12 says `none` on all 30 validation year rows (with the
right year in `to`), y0 says a year ("2019", "2018", …) as the domain. (The same y12 on a 2-core Intel Xeon with AMX
the day before: 0.910 / 0.880, the 200's years 5 / 10, all validation years 0.40, random years 12 / 15: the
machines' bfloat16 arithmetic differs, and so do the runs; seeds are still to be run.)
The cause of the year rows' domain is the control rows (noise and no injection, labelled `none`): with none of them
(`--control-share 0`, y12, same machine) validation is 0.960 / 0.905 (unseen 10 / 28), history 0.73 / 0.36, all 15
validation years 0.47 / 0.73, random years 0.67 / 0.87, history's training items 0.74 / 0.62, new phrasings
0.67 / 0.52. The pipeline's own read (`select_read.py 3 last4 --source 26`, same machine, 3 epochs): 0.880 / 0.840,
unseen 2 / 28, the 200's years 0 / 10. Not robust: with control share 0.1 (`--control-share 0.1`, y12, same
machine) no year is read: 0.905 / 0.855 (unseen 3 / 28), the 200's years 0 / 10, all validation years 0.07 / 0.07,
random years 0.00 / 0.07, with the domain said as "none; period;" or "11th"; its controls name a domain on 0.065 of
the 200 under noise, 0.000 with no injection. Reading the digits is a basin that one run finds and another misses:
seeds (and the control share) must be chosen on validation before the pipeline takes this read.
**Three seeds (2026-12-07, 2-core AMD EPYC with avx512_bf16, no AMX, `select_years.py 3 12 --source 26 --digits 29
--seeds 0 1 2`, about 21 min of training and 8 of scoring per describer).** Seed 0 gives the 2026-12-06 numbers on
the same CPU model to the digit. Seeds 0 / 1 / 2: validation 0.885 / 0.890, 0.920 / 0.905, 0.895 / 0.905 (domain
0.900 ± 0.015, answer 0.900 ± 0.007), unseen answers 11, 9, 9 of 28; the 200's years 10, 6, 7 of 10; all 15
validation years 0.867, 0.467, 0.533; random years on validation prompts 0.933, 0.533, 0.533; history's training
items 0.41 / 0.54, 0.49 / 0.55, 0.46 / 0.40; new phrasings 0.63 / 0.51, 0.61 / 0.54, 0.61 / 0.54; controls name a
domain (and a `to` value) on 0.000, 0.010, 0.010 of the 200 under noise and 0.000 with no injection. Years are read on
every seed, between half and nine tenths of them: not a basin one run finds. The domain field read from a closed
vocabulary with `none` left out beside a `to` value (`forced_choice.closed_domains`): validation 0.905, 0.925, 0.930
(+0.020 on average over the free decoding, never lower), the 15 validation years' domain 0.40, 0.27, 0.73 (free
0.00, 0.27, 0.00), random years 0.47, 0.53, 0.73 (free 0.00, 0.07, 0.00), history's training items 0.60, 0.59,
0.74 (free 0.41, 0.49, 0.46); closed without that rule changes nothing (± 0.05). The controls say no `to` value, so
the rule adds no false pressure there.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from select_init import at_rows, rates, scoring_sets, train_only  # scripts/ is on the path of a script run from it
from select_read import LAST_SLOTS, SOURCE_LAYER, report
from select_source_layer import selection_inputs

import gradsense
from gradsense import evaluate as ev
from gradsense import forced_choice as fc
from gradsense.describer import DescriberConfig
from gradsense.gradients import slot_gradients
from gradsense.teacher import NO_DOMAIN, label_head, parse_label

K = 6  # target positions read: a bare space and four digits
YEAR = r"\d{3,4}"


def random_years(items: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n copies of each item, its target replaced by a random year (not its target or source) and its label's `to`
    by that year; `row` left to the caller."""
    rng = np.random.default_rng(seed)
    copies = []
    for _, item in items.iterrows():
        head = parse_label(item["label"])
        taken = {str(item["target"]), str(item.get("source", ""))}
        for j in range(n):
            year = str(rng.integers(1000, 2026))
            while year in taken:
                year = str(rng.integers(1000, 2026))
            taken.add(year)
            copy = item.copy()
            copy["id"], copy["target"] = f"{item['id']}~y{j}", year
            copy["label"] = label_head(head["domain"], head["from"], year)
            copies.append(copy)
    return pd.DataFrame(copies).reset_index(drop=True)


def said_pressure(scored: pd.DataFrame) -> str:
    """How often a control's description names a domain at all, a `to` value, and the injected item's domain."""
    named = ~scored["reported_domain"].fillna(NO_DOMAIN).isin([NO_DOMAIN, ""])
    valued = fc.names_a_value(scored["reported_to"].tolist())
    return (
        f"a domain {named.mean():.3f}, a `to` value {valued.mean():.3f} (the item's {scored['domain_ok'].mean():.3f})"
    )


def closed_rates(describer, grads: np.ndarray, scored: pd.DataFrame, items: pd.DataFrame, domains: list[str]) -> str:
    """Domain accuracy with the domain field read from a closed vocabulary (`forced_choice.closed_domains`): among
    the domain names and `none` (closed), and with `none` left out where the description names a `to` value (closed,
    to-consistent); beside the free decoding's."""
    candidates = [*domains, NO_DOMAIN]
    scores = fc.domain_logprobs(describer, np.asarray(grads)[items["row"].to_numpy()], candidates)
    truth = items["domain"].to_numpy()
    closed = fc.closed_domains(scores, candidates, [None] * len(items))
    consistent = fc.closed_domains(scores, candidates, scored["reported_to"].tolist())
    return (
        f"domain free {scored['domain_ok'].mean():.3f}, closed {(closed == truth).mean():.3f}, "
        f"closed to-consistent {(consistent == truth).mean():.3f} (n = {len(items)})"
    )


def each_gradients(
    model, tokenizer, items: pd.DataFrame, source: int = SOURCE_LAYER, digits: int | None = None, progress: bool = True
) -> np.ndarray:
    """Gradients of the items' (prompt, target) read as `both6`: (n, LAST_SLOTS + K − 1, d), the last prompt
    position's from block `source`, the target positions' from block `digits` (default `source`)."""
    return slot_gradients(model, tokenizer, items, source, digits, LAST_SLOTS, K, progress=progress)


def main(
    epochs: float,
    counts: list[int],
    source: int = SOURCE_LAYER,
    digits: int | None = None,
    control_shares: Sequence[float] = (0.2,),
    seeds: Sequence[int] = (0,),
) -> None:
    """Train and score one describer per count of random years per training year, control share and seed."""
    inputs = selection_inputs()
    scored_items, seen, phrasings, options = scoring_sets(inputs)
    model, tokenizer = gradsense.load_model(None)  # gradients come from the frozen model
    items = inputs.stage.items
    n_rows = len(inputs.stage.arrays["ids"])
    needed = items[
        items["row"].isin(np.concatenate([inputs.train_items["row"], inputs.val_set["row"], scored_items["row"]]))
    ]
    val_years = inputs.val_pool[inputs.val_pool["target"].str.fullmatch(YEAR)].reset_index(drop=True)
    known = pd.concat([needed, val_years]).drop_duplicates("row")
    base = each_gradients(model, tokenizer, known, source, digits)
    grads = at_rows(base, known["row"].to_numpy(), n_rows)
    ext_grads = each_gradients(model, tokenizer, phrasings, source, digits, progress=False)
    history = inputs.train_items[inputs.train_items["domain"] == "history"].reset_index(drop=True)
    train_years = inputs.train_items[inputs.train_items["target"].str.fullmatch(YEAR)]
    val_random = random_years(val_years, 1, seed=1)
    val_random_grads = each_gradients(model, tokenizer, val_random, source, digits)
    print(
        f"{len(train_years)} training years, {len(val_years)} validation years; {n_rows} stage rows",
        flush=True,
    )
    per_seed: dict[tuple[int, float], list[pd.DataFrame]] = {}
    for n in counts:
        extra = random_years(train_years, n, seed=0) if n else train_years.iloc[:0]
        extra = extra.assign(row=n_rows + np.arange(len(extra)))
        all_grads = np.concatenate([grads, each_gradients(model, tokenizer, extra, source, digits)]) if n else grads
        by_id = dict(zip(inputs.train_items["id"], inputs.negatives, strict=True))
        negatives = list(inputs.negatives) + [by_id[i.split("~")[0]] for i in extra["id"]]
        augmented = dataclasses.replace(
            inputs, train_items=pd.concat([inputs.train_items, extra], ignore_index=True), negatives=negatives
        )
        for share, seed in itertools.product(control_shares, seeds):
            config = DescriberConfig(
                source_layer=source,
                inject_layer=15,
                k=LAST_SLOTS + K - 1,
                init="lens",
                lora_rank=8,
                precision="bf16",
                read="each",
            )  # rebuilt per describer: training writes its decoding cap into it
            describer, seconds = train_only(config, epochs, augmented, all_grads, control_share=share, seed=seed)
            sets = {
                "validation": (all_grads, scored_items),
                "validation years": (all_grads, val_years),
                "validation prompts, random years": (
                    val_random_grads,
                    val_random.assign(row=np.arange(len(val_random))),
                ),
                "history's training items": (all_grads, history),
                "new phrasings": (ext_grads, phrasings),
            }
            tables = {name: ev.describe_items(describer, g, rows, **options) for name, (g, rows) in sets.items()}
            noise, blank = (
                ev.describe_items(describer, all_grads, scored_items, c, **options) for c in ("noise", "none")
            )
            val, vy, vr = tables["validation"], tables["validation years"], tables["validation prompts, random years"]
            fit = tables["history's training items"]
            print(
                f"y{n} source {source} digits {digits or source} control share {share} seed {seed} (+{len(extra)} rows, {seconds:.0f} s): validation {report(val, scored_items, seen)}; "
                f"validation years {rates(vy)}; validation prompts, random years {rates(vr)}; "
                f"history's training items {report(fit, history)}; new phrasings (not for the choice) "
                f"{report(tables['new phrasings'], phrasings)}; controls on the 200: {said_pressure(noise)} under noise, "
                f"{said_pressure(blank)} with no injection",
                flush=True,
            )
            for name, (g, rows) in sets.items():
                print(f"  {name}: {closed_rates(describer, g, tables[name], rows, options['domains'])}", flush=True)
            for name, table in (("validation years", vy), ("validation prompts, random years", vr)):
                said = table["reported_domain"].fillna("-").value_counts().to_dict()
                print(f"  {name}: domains said {said}; to {table['reported_to'].fillna('-').tolist()}", flush=True)
            per_seed.setdefault((n, share), []).append(val)
    for (n, share), runs in per_seed.items():
        if len(runs) > 1:
            for metric in ("domain_ok", "answer_ok"):
                values = [float(t[metric].mean()) for t in runs]
                print(f"y{n} share {share} {metric} over seeds {seeds}: {np.mean(values):.3f} ± {np.std(values):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("epochs", type=float)
    parser.add_argument("counts", type=int, nargs="+", help="random years per training year, one describer each")
    parser.add_argument("--source", type=int, default=SOURCE_LAYER, help="the block the last-position slots read")
    parser.add_argument("--digits", type=int, default=None, help="the block the target-position slots read")
    parser.add_argument(
        "--control-share",
        type=float,
        nargs="+",
        default=[0.2],
        help="share of each batch that is a noise or no-injection row (one describer per share and count)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (each a describer)")
    args = parser.parse_args()
    main(args.epochs, args.counts, args.source, args.digits, args.control_share, args.seeds)
