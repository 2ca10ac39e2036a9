"""`scratchlm compare`: architecture and training choices measured at equal compute.

A variants file (TOML) names a few variants, each a set of config overrides (`--set` keys) on a
shared base. `compare(...)` pretrains every variant on the same dataset with the same budget
(wall-clock minutes, or model FLOPs so that CPU and GPU results line up), N seeds each, with the
runs interleaved (seed by seed, the variant order reversed on every other seed) so that machine
noise falls evenly on all variants. It then writes a report: validation bits per byte against
tokens, FLOPs and seconds; a table of parameters, throughput and final bpb (mean ± std over
seeds) with Welch's t-test against the first variant; optionally a learning-rate sweep with
stability figures (loss spikes, divergence) and length extrapolation (bpb at k x the training
context).

    # variants file
    [compare]                       # optional settings of the comparison itself
    config = "tiny"                 # recipe the base starts from (default: the config defaults)
    lr_sweep = [1e-3, 3e-3, 1e-2]   # also train each variant (seed 0) at these peak LRs
    extrapolation = [1, 2, 4]       # bpb at these multiples of train.seq_len
    [base]                          # overrides shared by every variant
    "train.lr" = 3e-3
    [variants.post_ln]
    "model.norm_position" = "post"
    [variants.pre_ln]
    "model.norm_position" = "pre"

Not for training itself (that is `scratchlm.train.pretrain`) nor for rendering reports
(`scratchlm.report` does the Markdown/HTML).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.files import atomic_write_json, read_json

VARIANTS_DIR = Path(__file__).resolve().parents[2] / "configs" / "compare"
BUDGET_UNITS = ("minutes", "flops")
CURVE_POINTS = 8  # validation evaluations per run (the curves in the report)
MIN_STEPS = 10  # below this, one optimizer step is more than 5% of a FLOPs budget
SPIKE_RATIO = 1.2  # a training loss this many times the lowest one so far is a spike
RESULT_FILE = "result.json"


# ---------------------------------------------------------------------------------------------
# The variants file


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # "section.key" -> value, applied after the base


@dataclass
class CompareSpec:
    """What a variants file says: the base, the variants and the extra measurements."""

    path: Path
    variants: list[Variant]
    base: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    lr_sweep: list[float] = field(default_factory=list)
    extrapolation: list[float] = field(default_factory=list)
    title: str = ""


SETTINGS_KEYS = ("config", "lr_sweep", "extrapolation", "title")


def resolve_variants_path(path: str | Path) -> Path:
    """A variants file as given, or a bare name (`norm-placement`) from configs/compare/."""
    p = Path(path)
    if p.is_file():
        return p
    named = VARIANTS_DIR / (p.name if p.suffix == ".toml" else p.name + ".toml")
    if named.is_file():
        return named
    known = sorted(f.stem for f in VARIANTS_DIR.glob("*.toml")) if VARIANTS_DIR.is_dir() else []
    raise UserError(f"variants file not found: {path} (ready-made: {', '.join(known) or 'none'})")


def load_variants(path: str | Path) -> CompareSpec:
    """Read and check a variants file; every override is validated against the config now."""
    from scratchlm.config import read_toml

    path = resolve_variants_path(path)
    data = read_toml(path)
    unknown = set(data) - {"compare", "base", "variants"}
    if unknown:
        raise UserError(f"{path}: unknown table(s) {', '.join(sorted(unknown))} "
                        "(expected [compare], [base], [variants.NAME])")
    settings = _table(data.get("compare", {}), path, "[compare]")
    for key in settings:
        if key not in SETTINGS_KEYS:
            raise UserError(f"{path}: [compare] has unknown key {key!r} (valid: {', '.join(SETTINGS_KEYS)})")
    base = _overrides(_table(data.get("base", {}), path, "[base]"), path, "[base]")
    variants_table = _table(data.get("variants", {}), path, "[variants]")
    variants = [Variant(name, _overrides(_table(v, path, f"[variants.{name}]"), path, f"[variants.{name}]"))
                for name, v in variants_table.items()]
    if len(variants) < 2:
        raise UserError(f"{path}: needs at least two [variants.NAME] tables, found {len(variants)}")
    spec = CompareSpec(
        path=path, variants=variants, base=base, recipe=settings.get("config"),
        lr_sweep=_numbers(settings.get("lr_sweep", []), path, "compare.lr_sweep"),
        extrapolation=_numbers(settings.get("extrapolation", []), path, "compare.extrapolation"),
        title=str(settings.get("title", "")),
    )
    for variant in spec.variants:  # fail now, not after an hour of training the first variants
        build_config(spec, variant, seed=0)
    return spec


def _table(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{path}: {where} must be a table")
    return value


def _overrides(table: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):  # [base.train] style nesting: flatten to "train.key"
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        elif "." not in key:
            raise UserError(f"{path}: {where} key {key!r} must be section.key, e.g. \"train.lr\"")
        else:
            out[key] = value
    return out


def _numbers(value: Any, path: Path, key: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and v > 0 for v in value):
        raise UserError(f"{path}: {key} must be a list of positive numbers, got {value!r}")
    return [float(v) for v in value]


def build_config(spec: CompareSpec, variant: Variant, seed: int, lr: float | None = None):
    """The config of one run: defaults < recipe < [base] < the variant < seed (and sweep lr)."""
    from scratchlm.config import load_config, set_value

    config = load_config(spec.recipe) if spec.recipe else load_config()
    for source, overrides in ((f"{spec.path} [base]", spec.base),
                              (f"{spec.path} [variants.{variant.name}]", variant.overrides)):
        for dotted, value in overrides.items():
            section, key = dotted.split(".", 1)
            set_value(config, section, key, value, source)
    config.train.seed = seed
    if lr is not None:
        config.train.lr = lr
    return config


# ---------------------------------------------------------------------------------------------
# Budgets and the run plan


@dataclass
class Budget:
    value: float
    unit: str  # minutes | flops

    def describe(self) -> str:
        return f"{self.value:g} minutes" if self.unit == "minutes" else f"{self.value:.3g} FLOPs"


def parse_budget(text: str | float, unit: str = "minutes") -> Budget:
    if unit not in BUDGET_UNITS:
        raise UserError(f"--budget-unit must be one of {', '.join(BUDGET_UNITS)}, got {unit!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"--budget must be a number ({unit}), got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise UserError(f"--budget must be positive, got {text!r}")
    return Budget(value, unit)


@dataclass
class RunSpec:
    variant: Variant
    seed: int
    lr: float | None = None  # set for the LR sweep runs

    @property
    def name(self) -> str:
        lr = f"-lr{self.lr:g}" if self.lr is not None else ""
        return f"{self.variant.name}{lr}-s{self.seed}"


def plan_runs(variants: list[Variant], seeds: int, lr_sweep: list[float] = ()) -> list[RunSpec]:
    """Every variant once per seed, seed after seed, the order reversed on odd seeds (ABBA...),
    so slow drift of the machine's load lands on all variants alike; then the LR sweep (seed 0)."""
    plan = []
    for seed in range(seeds):
        order = variants if seed % 2 == 0 else list(reversed(variants))
        plan += [RunSpec(v, seed) for v in order]
    for i, lr in enumerate(lr_sweep):
        order = variants if i % 2 == 0 else list(reversed(variants))
        plan += [RunSpec(v, 0, lr) for v in order]
    return plan


def apply_budget(config, budget: Budget, flops_per_token: float) -> None:
    """Set the stop condition for this budget, and the settings every compare run shares (in place)."""
    from scratchlm.train.trainer import accumulation_steps

    cfg = config.train
    tokens_per_step = cfg.micro_batch_size * cfg.seq_len * accumulation_steps(cfg)
    if budget.unit == "flops":
        steps = round(budget.value / (flops_per_token * tokens_per_step))
        if steps < MIN_STEPS:
            raise UserError(f"--budget {budget.value:.3g} FLOPs is only {steps} optimizer steps of "
                            f"{tokens_per_step} tokens for this model; give at least "
                            f"{MIN_STEPS * flops_per_token * tokens_per_step:.3g}")
        cfg.max_steps, cfg.max_minutes = steps, 0.0
        cfg.warmup_steps = min(cfg.warmup_steps, max(1, steps // 10))
    else:
        # the loop stops on the clock; max_steps only bounds it (and is what a cosine schedule
        # decays over, so under a minutes budget the schedule is in effect constant after warm-up)
        cfg.max_minutes = budget.value
        cfg.max_steps = 10**9
    cfg.eval_every = 0  # compare evaluates on its own cadence (`EvalSchedule`); the loop at the end
    cfg.ckpt_every = 0  # one checkpoint at the end: saving mid-run would eat the budget
    cfg.keep_checkpoints = 1
    cfg.log_every = 1  # every step, for the spike count and the evaluation cadence
    cfg.tensorboard = False
    cfg.progress = False


class EvalSchedule:
    """Validation bpb CURVE_POINTS times a run, evenly in steps (FLOPs budget) or in seconds
    (minutes budget, where the number of steps is not known in advance). Called with every
    logged record; the evaluation's time counts against the run's clock like the loop's own."""

    def __init__(self, budget: Budget, config, model, task, flops_per_token: float):
        from scratchlm.train.trainer import resolve_device, resolve_dtype

        self.budget, self.cfg, self.model, self.task = budget, config.train, model, task
        self.fpt = flops_per_token
        self.device = resolve_device(self.cfg.device)
        self.dtype = resolve_dtype(self.cfg.dtype, self.device)
        self.done = 0
        self.curve: list[dict[str, Any]] = []

    def due(self, record: dict[str, Any]) -> bool:
        if self.budget.unit == "flops":
            return record["step"] >= (self.done + 1) * self.cfg.max_steps / CURVE_POINTS
        return record["elapsed_s"] >= (self.done + 1) * self.budget.value * 60 / (CURVE_POINTS + 1)

    def __call__(self, record: dict[str, Any]) -> None:
        bpb = record.get("val_bpb")  # the loop evaluated this step itself (its last)
        if bpb is None and self.due(record):
            bpb = self.evaluate().get("val_bpb")
        if bpb is None:
            return
        self.done += 1
        self.curve.append({"step": record["step"], "tokens": record["tokens"],
                           "flops": record["tokens"] * self.fpt, "seconds": record["elapsed_s"],
                           "val_bpb": bpb})

    def evaluate(self) -> dict[str, float]:
        import torch

        from scratchlm.train.trainer import autocast_context

        self.model.eval()
        try:
            with torch.no_grad(), autocast_context(self.device, self.dtype):
                return self.task.evaluate(self.model)
        finally:
            self.model.train()


# ---------------------------------------------------------------------------------------------
# One run


def run_one(spec: CompareSpec, run: RunSpec, dataset, budget: Budget, run_dir: Path,
            tokenizer) -> dict[str, Any]:
    """Pretrain one variant/seed under the budget and measure it; returns (and saves) its result.

    The steps of `train.pretrain.pretrain`, spelled out so that compare can evaluate on its own
    cadence (`EvalSchedule`) and measure the final model in memory."""
    import torch

    from scratchlm.model import accounting
    from scratchlm.model.transformer import Transformer
    from scratchlm.runs import save_run
    from scratchlm.train.pretrain import PretrainTask, resolve_model_config, token_byte_lengths
    from scratchlm.train.trainer import TrainingDiverged, train

    config = build_config(spec, run.variant, run.seed, run.lr)
    config.data.path = str(dataset.path)
    model_cfg = resolve_model_config(config, tokenizer.vocab_size, config.train.seq_len)
    config.model.preset = model_cfg.preset
    config.model.overrides = {k: v for k, v in model_cfg.to_dict().items() if k != "preset"}
    fpt = float(accounting.flops_per_token(model_cfg, config.train.seq_len))
    apply_budget(config, budget, fpt)

    if run_dir.exists():  # an unfinished earlier attempt: start clean so the budget is honest
        shutil.rmtree(run_dir)
    torch.manual_seed(config.train.seed)
    model = Transformer(model_cfg)
    token_bytes = token_byte_lengths(tokenizer, model_cfg.vocab_size)
    task = PretrainTask(dataset, config.train, config.data, token_bytes=token_bytes)
    schedule = EvalSchedule(budget, config, model, task, fpt)
    diverged = None
    try:
        outcome = train(config, model, task, run_dir, on_step=schedule)
    except TrainingDiverged as e:
        diverged = str(e)
    else:
        if outcome.stopped == "signal":  # SIGINT/SIGTERM: stop the comparison, not just this run
            raise KeyboardInterrupt
    records = read_metrics(run_dir / "metrics.jsonl")
    state = _final_state(run_dir)
    last = records[-1] if records else {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    result = {
        "name": run.name, "variant": run.variant.name, "seed": run.seed, "lr": config.train.lr,
        "sweep": run.lr is not None,
        "params": accounting.num_parameters(model_cfg),
        "non_embedding_params": accounting.num_parameters(model_cfg, non_embedding=True),
        "flops_per_token": fpt,
        "steps": state.get("step", last["step"]),
        "tokens": state.get("tokens", last["tokens"]),
        "seconds": state.get("elapsed_s", last["elapsed_s"]),
        "tokens_per_sec": training_throughput(records),
        "diverged": diverged,
        "curve": schedule.curve,
        "stability": loss_stability(records, config.train.warmup_steps),
    }
    result["flops"] = result["tokens"] * fpt
    result["budget_used"] = (result["flops"] / budget.value if budget.unit == "flops"
                             else result["seconds"] / (budget.value * 60))
    if diverged is None:
        model.cpu()
        save_run(run_dir, model, tokenizer, config)
        result.update(final_measurements(model.eval(), dataset, config, spec.extrapolation, token_bytes))
        if not result["curve"] or result["curve"][-1]["tokens"] != result["tokens"]:
            result["curve"].append({"step": result["steps"], "tokens": result["tokens"],
                                    "flops": result["flops"], "seconds": result["seconds"],
                                    "val_bpb": result["final_bpb"]})
    else:
        result.update(final_bpb=None, extrapolation={})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the run dir keeps the weights
    atomic_write_json(run_dir / RESULT_FILE, result)
    return result


def _final_state(run_dir: Path) -> dict[str, Any]:
    """step / tokens / elapsed_s of the final checkpoint (the trainer's own clock)."""
    from scratchlm.train.checkpoint import CheckpointManager

    path = CheckpointManager(run_dir / "checkpoints").latest_valid(warn=lambda msg: None)
    if path is None:
        return {}
    state = read_json(path / "state.json", "checkpoint state")
    return {"step": int(path.name.split("_")[-1]), "tokens": int(state.get("tokens", 0)),
            "elapsed_s": float(state.get("elapsed_s", 0.0))}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def training_throughput(records: list[dict[str, Any]]) -> float | None:
    """Tokens per second of training alone (evaluations excluded), from the per-step records."""
    seconds, tokens, previous = 0.0, 0, 0
    for r in records:
        delta = r["tokens"] - previous
        previous = r["tokens"]
        if r.get("tokens_per_sec"):
            seconds += delta / r["tokens_per_sec"]
            tokens += delta
    return tokens / seconds if seconds > 0 else None


def loss_stability(records: list[dict[str, Any]], warmup_steps: int) -> dict[str, Any]:
    """Loss spikes (after warm-up, a loss above SPIKE_RATIO x the lowest so far; a run of such
    steps counts once), the largest such ratio, and whether the run ended worse than it began."""
    losses = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    spikes, worst, lowest, in_spike = 0, 1.0, math.inf, False
    for step, loss in losses:
        if step > warmup_steps and math.isfinite(lowest):
            ratio = loss / lowest
            worst = max(worst, ratio)
            if ratio > SPIKE_RATIO and not in_spike:
                spikes += 1
            in_spike = ratio > SPIKE_RATIO
        lowest = min(lowest, loss)
    first = losses[0][1] if losses else None
    last = losses[-1][1] if losses else None
    return {"spikes": spikes, "max_rise": worst, "first_loss": first, "last_loss": last,
            "max_grad_norm": max((r.get("grad_norm") or 0.0 for r in records), default=None)}


def final_measurements(model, dataset, config, multiples: list[float], token_bytes) -> dict[str, Any]:
    """Validation bpb of the final model on the training windows, and at k x the context."""
    import torch

    from scratchlm.train.pretrain import PretrainTask
    from scratchlm.train.trainer import autocast_context, resolve_dtype

    device = next(model.parameters()).device
    dtype = resolve_dtype(config.train.dtype, device)  # as the curve's evaluations ran

    def bpb_at(seq_len: int, batch: int) -> float | None:
        if model.config.positions == "learned" and seq_len > model.config.max_seq_len:
            return None  # no position embeddings exist beyond the table
        train_cfg = dataclasses.replace(config.train, seq_len=seq_len, micro_batch_size=batch)
        task = PretrainTask(dataset, train_cfg, config.data, token_bytes=token_bytes)
        with torch.no_grad(), autocast_context(device, dtype):
            return task.evaluate(model).get("val_bpb")

    cfg = config.train
    out = {"final_bpb": bpb_at(cfg.seq_len, cfg.micro_batch_size), "extrapolation": {}}
    for k in multiples:
        length = int(round(k * cfg.seq_len))
        # the same number of tokens at every length: fewer, longer windows
        out["extrapolation"][f"{k:g}"] = bpb_at(length, max(1, int(cfg.micro_batch_size / k)))
    return out


# ---------------------------------------------------------------------------------------------
# Statistics: Welch's t-test without scipy


def welch_t_test(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """(t, degrees of freedom, two-sided p) for mean(a) != mean(b) with unequal variances;
    None with fewer than two samples on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return (0.0, math.inf, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), math.inf, 0.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, student_t_two_sided_p(t, df)


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(df):
        return math.erfc(abs(t) / math.sqrt(2))
    return regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), using the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction would converge slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a


def _beta_continued_fraction(x: float, a: float, b: float, iterations: int = 300) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, iterations + 1):
        # the even term d_{2m}, then the odd term d_{2m+1} of the fraction
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return value


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------------------------------------
# The whole comparison


@dataclass
class CompareResult:
    out_dir: Path
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    report: Path


def compare(data: str | Path, budget: Budget, variants: str | Path | CompareSpec, out: str | Path,
            seeds: int = 2, progress: bool = True, command: str = "",
            threads: int | None = None) -> CompareResult:
    """Train every variant x seed (and the LR sweep) under `budget`; write `out/report.md`.

    `threads` sets torch's intra-op threads for the whole comparison (on a CPU shared with other
    work, 1 thread per process avoids the spin-waiting that makes small models crawl)."""
    import torch

    from scratchlm.data.shards import Dataset
    from scratchlm.train.pretrain import find_tokenizer

    spec = variants if isinstance(variants, CompareSpec) else load_variants(variants)
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    data_dir, out_dir = Path(data), Path(out)
    dataset = Dataset.open(data_dir)  # a bad dataset fails before any training
    tokenizer = find_tokenizer(data_dir, None)
    dataset.verify_tokenizer(tokenizer.fingerprint, tokenizer.vocab_size)
    plan = plan_runs(spec.variants, seeds, spec.lr_sweep)
    runs = []
    bar = _bar(len(plan), progress)
    for run in plan:
        if bar is not None:
            bar.set_postfix_str(run.name)
        same = _same_as_main_run(spec, run, runs)
        if same is not None:  # a sweep point at the variant's own lr is its seed-0 run: reuse it
            runs.append({**same, "name": run.name, "sweep": True})
        else:
            runs.append(run_one(spec, run, dataset, budget, out_dir / "runs" / run.name, tokenizer))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = summarize(spec, [r for r in runs if not r["sweep"]])
    atomic_write_json(out_dir / "results.json", {
        "variants_file": str(spec.path), "budget": dataclasses.asdict(budget), "seeds": seeds,
        "order": [r.name for r in plan], "summary": summary, "runs": runs, "command": command,
    })
    report = write_report(spec, budget, seeds, plan, runs, summary, out_dir, command)
    return CompareResult(out_dir, runs, summary, report)


def _same_as_main_run(spec: CompareSpec, run: RunSpec, done: list[dict[str, Any]]) -> dict | None:
    if run.lr is None:
        return None
    if build_config(spec, run.variant, run.seed).train.lr != run.lr:
        return None
    return next((r for r in done if not r["sweep"] and r["variant"] == run.variant.name
                 and r["seed"] == run.seed), None)


def summarize(spec: CompareSpec, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: sizes, means over seeds, and Welch's test of its final bpb against the first."""
    rows = []
    reference = None
    for variant in spec.variants:
        mine = [r for r in runs if r["variant"] == variant.name]
        bpbs = [r["final_bpb"] for r in mine if r["final_bpb"] is not None]
        mean, std = mean_std(bpbs)
        row = {
            "variant": variant.name, "runs": len(mine), "diverged": sum(1 for r in mine if r["diverged"]),
            "params": mine[0]["params"] if mine else None,
            "non_embedding_params": mine[0]["non_embedding_params"] if mine else None,
            "tokens": mean_std([r["tokens"] for r in mine])[0],
            "flops": mean_std([r["flops"] for r in mine])[0],
            "seconds": mean_std([r["seconds"] for r in mine])[0],
            "tokens_per_sec": mean_std([r["tokens_per_sec"] for r in mine if r["tokens_per_sec"]])[0],
            "bpb_values": bpbs, "bpb_mean": mean, "bpb_std": std,
            "extrapolation": {k: mean_std([r["extrapolation"][k] for r in mine
                                           if r["extrapolation"].get(k) is not None])[0]
                              for k in (mine[0]["extrapolation"] if mine else {})},
        }
        if reference is None:
            reference = row
            row.update(delta=None, t=None, df=None, p=None)
        else:
            test = welch_t_test(bpbs, reference["bpb_values"])
            row["delta"] = (mean - reference["bpb_mean"]) if mean is not None and reference["bpb_mean"] is not None else None
            row["t"], row["df"], row["p"] = test if test else (None, None, None)
        rows.append(row)
    return rows


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="compare", unit="run", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# The report


def write_report(spec, budget, seeds, plan, runs, summary, out_dir: Path, command: str) -> Path:
    from scratchlm.report import Report

    main_runs = [r for r in runs if not r["sweep"]]
    report = Report(title=f"compare: {spec.title or spec.path.stem}", intro=(
        f"{len(spec.variants)} variants x {seeds} seed(s) on the same data, each run under a budget "
        f"of {budget.describe()}; runs interleaved in the order "
        f"{', '.join(r.name for r in plan if r.lr is None)}."))
    setup = report.section("Setup")
    if command:
        setup.code(command, "sh", "command")
    schedule = ("the run's steps are known, so the LR schedule decays over them" if budget.unit == "flops"
                else "train.max_steps is unbounded, so a cosine schedule stays near its peak after warm-up")
    setup.key_values([("budget per run", f"{budget.describe()} ({schedule})"),
                      ("variants file", str(spec.path)), ("base recipe", spec.recipe or "defaults"),
                      ("shared overrides", _fmt_overrides(spec.base) or "none")]
                     + [(f"variant {v.name}", _fmt_overrides(v.overrides) or "(base only)")
                        for v in spec.variants])

    results = report.section("Results")
    results.table(
        ["variant", "params", "non-emb params", "tokens", "FLOPs", "seconds", "train tokens/s",
         "final val bpb (mean ± std)", "Δ vs " + spec.variants[0].name, "Welch t (df)", "p"],
        [[s["variant"], s["params"], s["non_embedding_params"], _int(s["tokens"]), s["flops"],
          s["seconds"], s["tokens_per_sec"], _pm(s["bpb_mean"], s["bpb_std"]),
          _signed(s["delta"]), _t(s), s["p"]] for s in summary],
        caption="final bpb on the same validation windows for every run; p from Welch's two-sided "
                "t-test of each variant's per-seed final bpb against the first variant's")
    results.paragraph(" ".join(conclusions(summary, seeds)))
    for axis, label in (("tokens", "tokens seen"), ("flops", "training FLOPs (6N + attention)"),
                        ("seconds", "wall-clock seconds")):
        name = f"bpb_vs_{axis}.png"
        if plot_curves(out_dir / name, main_runs, spec.variants, axis, label):
            results.image(name, f"validation bpb against {label}")

    check = report.section("Budget check")
    check.paragraph("Each run's use of the budget: "
                    + ("FLOPs = tokens x FLOPs per token; the run stops at the step that reaches it."
                       if budget.unit == "flops" else
                       "seconds on the trainer's clock (evaluations included); it stops at the first "
                       "step past the budget."))
    check.table(["run", "steps", "tokens", "FLOPs", "seconds", "budget used"],
                [[r["name"], r["steps"], r["tokens"], r["flops"], r["seconds"],
                  f"{100 * r['budget_used']:.1f}%"] for r in runs])

    if spec.lr_sweep:
        lr_section(report, spec, runs, out_dir)
    if spec.extrapolation:
        extrapolation_section(report, spec, summary)
    md, _ = report.write(out_dir)
    return md


def lr_section(report, spec, runs, out_dir: Path) -> None:
    sweep = [r for r in runs if r["sweep"]]
    section = report.section("Learning-rate sweep: stability")
    section.paragraph(
        f"Each variant trained once (seed 0) at each peak learning rate. A spike is a step after "
        f"warm-up whose training loss exceeds {SPIKE_RATIO}x the lowest loss seen before it (a run of "
        f"such steps counts once); 'max rise' is the largest such ratio; diverged means the trainer "
        f"stopped on NaN/Inf or the final loss was no lower than the first.")
    rows = []
    for r in sorted(sweep, key=lambda r: (r["variant"], r["lr"])):
        st = r["stability"]
        failed = bool(r["diverged"]) or (st["last_loss"] is not None and st["first_loss"] is not None
                                         and st["last_loss"] >= st["first_loss"])
        rows.append([r["variant"], r["lr"], st["spikes"], st["max_rise"], st["max_grad_norm"],
                     "yes" if failed else "no", r["final_bpb"]])
    section.table(["variant", "peak lr", "spikes", "max rise", "max grad norm", "diverged", "final bpb"], rows)
    if plot_lr_sweep(out_dir / "lr_sweep.png", sweep, spec.variants):
        section.image("lr_sweep.png", "final validation bpb against peak learning rate")


def extrapolation_section(report, spec, summary) -> None:
    section = report.section("Length extrapolation")
    keys = [f"{k:g}" for k in spec.extrapolation]
    section.paragraph("Validation bpb of the final models on windows of k x the training context "
                      "(the same number of tokens at every length; mean over seeds). A dash: the "
                      "model has no positions there (a learned table ends at model.max_seq_len).")
    section.table(["variant"] + [f"{k}x" for k in keys],
                  [[s["variant"]] + [s["extrapolation"].get(k) for k in keys] for s in summary])


def conclusions(summary: list[dict[str, Any]], seeds: int, alpha: float = 0.05) -> list[str]:
    """Plain sentences: which variant is best, and which differences the test supports."""
    ok = [s for s in summary if s["bpb_mean"] is not None]
    if not ok:
        return ["No run finished."]
    best = min(ok, key=lambda s: s["bpb_mean"])
    lines = [f"Lowest mean final bpb: {best['variant']} ({best['bpb_mean']:.4f})."]
    ref = summary[0]["variant"]
    for s in summary[1:]:
        if s["bpb_mean"] is None:
            lines.append(f"{s['variant']}: no finished run.")
        elif s["p"] is None:
            lines.append(f"{s['variant']} vs {ref}: Δ {s['delta']:+.4f} bpb; no test (needs 2+ seeds).")
        else:
            verdict = "significant" if s["p"] < alpha else "NOT significant"
            lines.append(f"{s['variant']} vs {ref}: Δ {s['delta']:+.4f} bpb, p = {s['p']:.3g} "
                         f"({verdict} at {alpha} with {seeds} seeds).")
    for s in summary:
        if s["diverged"]:
            lines.append(f"{s['variant']}: {s['diverged']} of {s['runs']} runs diverged.")
    return lines


def plot_curves(path: Path, runs, variants, axis: str, label: str) -> bool:
    """One line per run, one colour per variant (seeds share it)."""
    if not any(r["curve"] for r in runs):
        return False
    fig, ax = _figure()
    for i, variant in enumerate(variants):
        colour = f"C{i % 10}"
        for j, r in enumerate(r for r in runs if r["variant"] == variant.name and r["curve"]):
            xs = [p[axis] for p in r["curve"]]
            ys = [p["val_bpb"] for p in r["curve"]]
            ax.plot(xs, ys, "o-", color=colour, markersize=3, linewidth=1, alpha=0.9 if j == 0 else 0.55,
                    label=variant.name if j == 0 else None)
    ax.set_xlabel(label)
    ax.set_ylabel("validation bits per byte")
    _save(fig, ax, path)
    return True


def plot_lr_sweep(path: Path, sweep, variants) -> bool:
    finished = [r for r in sweep if r["final_bpb"] is not None]
    if not finished:
        return False
    fig, ax = _figure()
    for i, variant in enumerate(variants):
        pts = sorted((r["lr"], r["final_bpb"]) for r in finished if r["variant"] == variant.name)
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i % 10}", label=variant.name)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation bits per byte")
    _save(fig, ax, path)
    return True


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    return fig, fig.add_subplot()


def _save(fig, ax, path: Path) -> None:
    import io

    from scratchlm.files import atomic_write_bytes

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _fmt_overrides(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def _pm(mean, std) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.4f}"


def _int(value):
    return None if value is None else int(round(value))


def _t(s) -> str:
    if s.get("t") is None:
        return "–"
    return f"{s['t']:.2f} ({s['df']:.1f})"


# ---------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train variants of a config at equal compute and report which is better",
        description="Pretrain each variant of a variants file (TOML: [base] + [variants.NAME] "
        "tables of section.key overrides) on the same data and budget, N seeds each, runs "
        "interleaved; write OUT/report.md with bpb curves, a table and Welch's t-tests.",
    )
    p.add_argument("--data", required=True, help="dataset dir made by `scratchlm data prepare`")
    p.add_argument("--budget", required=True, help="per run: minutes (default) or FLOPs")
    p.add_argument("--budget-unit", choices=BUDGET_UNITS, default="minutes")
    p.add_argument("--variants", required=True,
                   help="variants TOML: a path, or a name in configs/compare/ (e.g. norm-placement)")
    p.add_argument("--seeds", type=int, default=2, help="runs per variant (default 2)")
    p.add_argument("--out", required=True, help="directory for runs/, results.json and report.md")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    budget = parse_budget(args.budget, args.budget_unit)
    command = "scratchlm compare " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
    result = compare(args.data, budget, args.variants, args.out, seeds=args.seeds, command=command,
                     threads=args.threads)
    print(result.report)
    return 0
