"""One describer training of the ablations (another seed, a variant, a held-out-domain fold): its spec in params.yaml
(`runs:`), its run (a `training@<key>` stage instance in dvc.yaml, `gradsense run <key>`), and its files."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradsense import controls as ct
from gradsense import decoupling as dc
from gradsense import evaluate as ev
from gradsense import folds as fd
from gradsense import main_table as mt
from gradsense.errors import GradsenseError
from gradsense.files import atomic_dir

ROLES = ("seed", "reference", "variant", "fold")
VECTORS = {"gradient": "grads", "steering": "steering"}  # what a describer reads → its array in gradients.npz
REFERENCE = "main settings, variant budget"  # the reference run's label: the main settings at the variants' budget
FOLDER = Path("results") / "runs"
LAYERS = ("source_layer", "inject_layer")  # a run may give them as depth fractions, as params.yaml's train does
SCORING = ("selection_items", "fold_items", "batch_size")  # the ablations settings a run's scores depend on
_KEY = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class RunSpec:
    """One training: `role` (seed | reference | variant | fold), its label in the tables, the checkpoint settings it
    changes (`overrides`), what it trains on (gradient | steering) and, for a fold, the domain it holds out."""

    key: str
    role: str
    label: str
    overrides: dict = field(default_factory=dict)
    train_on: str = "gradient"
    fold: str | None = None

    @classmethod
    def parse(cls, key: str, spec: Mapping[str, Any]) -> RunSpec:
        """A spec from its params.yaml entry (`role`, optional `label`, `train_on`, `fold`, then settings)."""
        if not _KEY.fullmatch(str(key)):
            raise GradsenseError(f"run {key!r}: a run's key is lower-case letters, digits and _ (its stage name)")
        if not isinstance(spec, Mapping) or spec.get("role") not in ROLES:
            raise GradsenseError(f"run {key!r}: needs role: one of {', '.join(ROLES)}")
        spec = dict(spec)
        role, label = spec.pop("role"), spec.pop("label", None)
        train_on, fold = spec.pop("train_on", "gradient"), spec.pop("fold", None)
        if train_on not in VECTORS:
            raise GradsenseError(f"run {key!r}: train_on must be one of {', '.join(VECTORS)}, not {train_on!r}")
        if (role == "fold") != (fold is not None):
            raise GradsenseError(f"run {key!r}: a fold run names its held-out domain (fold: …), no other run does")
        if role == "seed" and "seed" not in spec:
            raise GradsenseError(f"run {key!r}: a seed run sets seed")
        if role == "variant" and not label:
            raise GradsenseError(f"run {key!r}: a variant needs a label (its row in the main table)")
        default = {"seed": f"seed {spec.get('seed')}", "reference": REFERENCE, "fold": f"held-out domain fold: {fold}"}
        return cls(key, role, label or default.get(role, key), spec, train_on, fold)


def run_specs(runs: Mapping[str, Mapping] | None) -> dict[str, RunSpec]:
    """Every run of params.yaml's `runs:` section, in order (at most one reference)."""
    specs = {str(k): RunSpec.parse(str(k), v) for k, v in (runs or {}).items()}
    if sum(s.role == "reference" for s in specs.values()) > 1:
        raise GradsenseError("runs: at most one run has role reference (the main settings at the variants' budget)")
    return specs


@dataclass
class RunContext:
    """What every run reads: the model, the main describer and its settings, the items and passages it trains on,
    and the items it is scored on (the evaluate stage's test items and decoupling plan for seeds; the controls
    stage's subset for variants; `selection_items` validation items; `fold_items` items of a held-out domain)."""

    model: Any
    tokenizer: Any
    main: Any
    inputs: Any
    neutral: list[str]
    train_items: pd.DataFrame
    val_pool: pd.DataFrame
    val_items: pd.DataFrame
    passages: tuple[list[str], list[list[str]]]
    main_test: pd.DataFrame
    main_decoupled: pd.DataFrame
    control_items: pd.DataFrame
    test_all: pd.DataFrame
    plan_all: pd.DataFrame
    test_sub: pd.DataFrame
    plan_sub: pd.DataFrame
    model_name: str | None = None
    device: str = "auto"
    seed: int = 0
    batch_size: int = 16
    fold_items: int | None = None

    @property
    def items(self) -> pd.DataFrame:
        """Every joined item (rows into the gradient arrays)."""
        return self.inputs.items

    @property
    def heldout_domain(self) -> str | None:
        """The domain the train stage's describer never saw."""
        return self.main.meta.get("heldout_domain")

    @property
    def domains(self) -> list[str]:
        """Every domain name (naming one = feeling a pressure; the fold's forced choice ranks them all)."""
        return sorted(self.items["domain"].unique())

    def options(self) -> dict:
        """Decoding settings of every score: the head only, as in the evaluate stage."""
        return {"seed": self.seed, "batch_size": self.batch_size, "max_new_tokens": 0, "domains": self.domains}


def load_context(
    paths,
    model_name: str | None = None,
    device: str = "auto",
    seed: int = 0,
    selection_items: int | None = 80,
    fold_items: int | None = 80,
    batch_size: int = 16,
) -> RunContext:
    """Load the model, the train stage's describer and every input a run needs from a run's artifacts (`paths`)."""
    import gradsense
    from gradsense.checkpoint import load_describer
    from gradsense.inputs import contexts_path, load_stage_inputs, read_contexts, training_items
    from gradsense.passages import training_passages
    from gradsense.sampling import stratified

    model, tokenizer = gradsense.load_model(model_name, device=device)
    main = load_describer(paths.checkpoint, model, tokenizer)
    inputs = load_stage_inputs(paths)
    items = inputs.items
    neutral = read_contexts(contexts_path()).query("pool == 'neutral'")["text"].tolist()
    train_items, val_pool = training_items(items, main.meta.get("heldout_domain"))
    val_items = stratified(val_pool, "domain", selection_items, order="shuffle", seed=seed)
    main_test = ev.main_test_rows(pd.read_csv(paths.descriptions))
    main_decoupled = pd.read_csv(paths.decoupling_items)
    control_items = pd.read_csv(paths.controls_items)
    main_sub = ct.stored_condition(control_items, ct.TRAINED)
    return RunContext(
        model=model,
        tokenizer=tokenizer,
        main=main,
        inputs=inputs,
        neutral=neutral,
        train_items=train_items,
        val_pool=val_pool,
        val_items=val_items,
        passages=training_passages(neutral, train_items, seed),
        main_test=main_test,
        main_decoupled=main_decoupled,
        control_items=control_items,
        test_all=ev.select_items(items, main_test["id"]),
        plan_all=dc.replay_plan(main_decoupled, items, None),
        test_sub=ev.select_items(items, main_sub[0]["id"]),
        plan_sub=dc.replay_plan(main_sub[1], items, None),
        model_name=model_name,
        device=device,
        seed=seed,
        batch_size=batch_size,
        fold_items=fold_items,
    )


def train_run(ctx: RunContext, spec: RunSpec):
    """Train one describer from the main checkpoint's settings with the spec's overrides, on the train stage's items
    and passages, or, for a fold, on those of every domain but the fold's (LoRA runs get a freshly loaded model, so
    adapters never leak into another run)."""
    import gradsense
    from gradsense.checkpoint import variant_configs
    from gradsense.gradients import resolve_layer
    from gradsense.inputs import training_items, validation_set
    from gradsense.passages import training_passages
    from gradsense.training import train_projector

    meta = ctx.main.meta
    overrides = {k: resolve_layer(ctx.model, v) if k in LAYERS else v for k, v in spec.overrides.items()}
    config, train = variant_configs(meta, overrides)
    run_model = ctx.model if config.lora_rank == 0 else gradsense.load_model(ctx.model_name, device=ctx.device)[0]
    source = ctx.inputs.vectors(VECTORS[spec.train_on], config.source_layer)
    rows, (passages, hard) = ctx.train_items, ctx.passages
    if spec.fold is not None:
        rows, _ = training_items(ctx.items, spec.fold)
        passages, hard = training_passages(ctx.neutral, rows, ctx.seed)
    # the validation items that pick the step are those of the train stage (of the trained domains)
    val_rows = validation_set(
        ctx.val_pool[ctx.val_pool["domain"] != spec.fold], meta.get("train", {}).get("val_items", 32)
    )
    describer, _ = train_projector(
        run_model,
        ctx.tokenizer,
        source[rows["row"].to_numpy()],
        rows["label"].tolist(),
        config,
        train,
        passages,
        hard_negatives=hard,
        val=(source[val_rows["row"].to_numpy()], val_rows["label"].tolist()),
    )
    return describer


def score_fold(ctx: RunContext, describer, domain: str) -> pd.DataFrame:
    """A describer scored on up to `fold_items` items of the held-out `domain` (`gradsense.folds.score_fold`)."""
    members = fd.fold_items(ctx.items, domain, ctx.fold_items, ctx.seed)
    grads = ctx.inputs.vectors("grads", describer.config.source_layer)
    return fd.score_fold(describer, grads, members, ctx.domains, ctx.seed, ctx.batch_size)


def execute(ctx: RunContext, spec: RunSpec) -> dict[str, pd.DataFrame]:
    """Train the run and score it; its frames by name: test + decoupled (seeds on every evaluate item, variants on
    the controls subset), selection (validation items), transfer_test + transfer_decoupled (steering-trained, on
    steering vectors), fold (a fold's domain; the reference's is the train stage's held-out domain)."""
    describer = train_run(ctx, spec)
    layer = describer.config.source_layer
    grads = ctx.inputs.vectors("grads", layer)
    frames: dict[str, pd.DataFrame] = {}
    if spec.role in ("seed", "reference", "variant"):
        test, plan = (ctx.test_all, ctx.plan_all) if spec.role == "seed" else (ctx.test_sub, ctx.plan_sub)
        frames["test"], frames["decoupled"] = mt.core_evaluation(
            describer, grads, ctx.items, test, plan, **ctx.options()
        )
    if spec.role in ("reference", "variant"):
        read = ctx.inputs.vectors(VECTORS[spec.train_on], layer)
        frames["selection"] = ev.describe_items(describer, read, ctx.val_items, **ctx.options())
    if spec.train_on == "steering":
        steering = ctx.inputs.vectors("steering", layer)
        frames["transfer_test"], frames["transfer_decoupled"] = mt.core_evaluation(
            describer, steering, ctx.items, ctx.test_sub, ctx.plan_sub, **ctx.options()
        )
    if spec.role == "fold" or (spec.role == "reference" and ctx.heldout_domain):
        frames["fold"] = score_fold(ctx, describer, spec.fold or ctx.heldout_domain)
    return frames


def run_folder(root: str | Path, key: str) -> Path:
    """`<root>/results/runs/<key>`: one run's frames (CSV) and its `run.json`."""
    return Path(root) / FOLDER / key


def write_run(root: str | Path, spec: RunSpec, frames: Mapping[str, pd.DataFrame]) -> Path:
    """Write a run's frames (full-precision CSV), its spec and which columns are text (so that "1789" reads back as
    text, not as a number), all at once: a failed write leaves no folder."""
    text = {name: [c for c in f.columns if not pd.api.types.is_numeric_dtype(f[c])] for name, f in frames.items()}
    with atomic_dir(run_folder(root, spec.key)) as tmp:
        for name, frame in frames.items():
            frame.to_csv(tmp / f"{name}.csv", index=False)
        record = {"spec": asdict(spec), "text_columns": text}
        (tmp / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return run_folder(root, spec.key)


def read_run(root: str | Path, spec: RunSpec) -> dict[str, pd.DataFrame]:
    """A run's frames by name; a missing run, or one trained with other settings, is a one-line error."""
    folder = run_folder(root, spec.key)
    path = folder / "run.json"
    if not path.is_file():
        raise GradsenseError(
            f"run {spec.key!r} has no results in {folder}: run `dvc repro` or `gradsense run {spec.key}`"
        )
    record = json.loads(path.read_text())
    if record.get("spec") != json.loads(json.dumps(asdict(spec))):
        raise GradsenseError(f"{folder} was trained with other settings than runs.{spec.key}: rerun it")
    return {
        name: pd.read_csv(folder / f"{name}.csv", dtype={c: str for c in columns})
        for name, columns in sorted(record["text_columns"].items())
    }


def run_instances(keys: list[str] | None, root: str | Path = ".", params_file: str | Path | None = None) -> list[Path]:
    """Run the named runs of params.yaml's `runs:` (all of them with `keys` None) in one process: each trained,
    scored and written to results/runs/<key>, its wall time and peak memory to results/timing/run_<key>.json.
    Under `accelerate launch` the processes share every training batch and the main process writes."""
    from gradsense.paths import Paths
    from gradsense.pipeline import read_params
    from gradsense.seeding import seed_everything
    from gradsense.timing import peak_rss_gb, save_timing
    from gradsense.training import Shards

    root = Path(root).resolve()
    params = read_params(params_file or root / "params.yaml")
    specs = run_specs(params.get("runs"))
    unknown = sorted(set(keys or []) - set(specs))
    if unknown:
        raise GradsenseError(f"no run {', '.join(unknown)} in the params file's runs: (have {', '.join(specs)})")
    model, scoring = params.get("model") or {}, params.get("ablations") or {}
    seed = int(params.get("seed", 0))
    start = time.perf_counter()
    ctx = load_context(
        Paths(root),
        model.get("name"),
        model.get("device", "auto"),
        seed,
        **{k: scoring[k] for k in SCORING if k in scoring},
    )
    load_s = round(time.perf_counter() - start, 2)  # the model and inputs, once per process (once per run in dvc)
    shards = Shards()
    main = shards.main
    written = []
    for key in keys or list(specs):
        spec = specs[key]
        seed_everything(seed)  # every run starts from the same state, in one process or one per run
        start = time.perf_counter()
        frames = execute(ctx, spec)
        if not main:  # under `accelerate launch` every process trains its share and scores; one writes
            continue
        written.append(write_run(root, spec, frames))
        precision = spec.overrides.get("precision", ctx.main.config.precision)
        seconds = round(time.perf_counter() - start, 2)
        record = {"run": key, "train_score_s": seconds, "load_s": load_s, "wall_s": round(seconds + load_s, 2)}
        record["processes"] = shards.world
        save_timing(root, f"run_{key}", record | {"precision": precision, "peak_rss_gb": peak_rss_gb()})
        print(f"run {key}: {seconds:.0f} s (+ {load_s:.0f} s loading) → {written[-1]}")
    return written
