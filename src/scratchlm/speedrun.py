"""`scratchlm speedrun`: the whole pipeline in one command, within a time budget, with a report card.

Stages, each calling its library module (no shelling out to the CLI), each writing into RUN/:
  1. tokenizer  byte-level BPE trained on a sample of the data            -> RUN/tokenizer/
  2. data       shards with filters and exact dedup, a held-out val split  -> RUN/data/
  3. pretrain   a model sized to the budget by a short throughput probe    -> RUN/base/
  4. sft, dpo   fine-tuning and alignment on the embedded stdlib pairs     -> RUN/sft/, RUN/dpo/
  5. eval       val bits per byte, held-out SFT loss, preference accuracy, docstring -> Python that
                parses, samples for fixed prompts, the --tasks-dir suite  -> RUN/eval/*.json
  6. quantize   INT8 and INT4 copies of the final model and their bpb      -> RUN/quant/
  7. report     RUN/report.md and RUN/report.html (+ PNG plots), built only from the files above
The state file RUN/speedrun.json (written atomically after every change) records each stage's
status, seconds and figures: re-running with the same --out skips finished stages and re-enters
an interrupted one, which resumes from its own checkpoints (the trainer does that by itself).

How the budget is split: the fixed-cost stages (tokenizer, data) run first; the pretraining share
is what is left after reserving fixed fractions of the budget for fine-tuning, evaluation and
quantization. The model is the largest of a ladder of shapes for which the measured throughput
gives at least `TOKENS_PER_PARAM` training tokens per parameter (Chinchilla's rule of thumb), so
a GPU or a faster CPU gets a bigger model from the same command.

Not for the stages' own logic (each lives in its module) nor for rendering (see `scratchlm.report`).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from scratchlm.errors import UserError
from scratchlm.files import atomic_write_json, read_json

DEFAULT_DATA = "builtin:python-stdlib"
DEFAULT_OUT = "runs/speedrun"
DEFAULT_MINUTES = 15.0
STATE_FILE = "speedrun.json"
STATE_VERSION = 1
STAGES = ("tokenizer", "data", "pretrain", "sft", "dpo", "eval", "quantize", "report")

# Shares of the whole budget reserved for the stages after pretraining (the rest, after the
# tokenizer and data stages have run, goes to pretraining).
POST_SHARES = {"sft": 0.13, "dpo": 0.10, "eval": 0.08, "quantize": 0.03, "report": 0.01}
TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class BudgetScale:
    """How much of everything a budget can afford besides pretraining (one place to tune)."""

    vocab_size: int
    tokenizer_sample_bytes: int
    posttrain_files: int | None  # stdlib files the SFT/DPO pairs come from (None = all)
    eval_tokens: int  # val tokens scored for bits per byte (the same for every model)
    heldout: int  # held-out SFT conversations / DPO pairs scored per model
    parse_prompts: int  # held-out docstrings the base and chat models are asked to implement
    parse_max_tokens: int  # also the length of the samples for fixed prompts
    probe_steps: int
    seq_len: int  # pretraining window on a CPU (a GPU uses 1024)
    micro_batch: int  # sequences per step on a CPU (a GPU uses 32)
    suite_limit: int  # examples per --tasks-dir task


QUICK_SCALE = BudgetScale(vocab_size=512, tokenizer_sample_bytes=256 << 10, posttrain_files=25, eval_tokens=2048,
                          heldout=8, parse_prompts=4, parse_max_tokens=32, probe_steps=1, seq_len=256,
                          micro_batch=4, suite_limit=2)
FULL_SCALE = BudgetScale(vocab_size=4096, tokenizer_sample_bytes=4 << 20, posttrain_files=None, eval_tokens=32768,
                         heldout=64, parse_prompts=16, parse_max_tokens=96, probe_steps=1, seq_len=512,
                         micro_batch=8, suite_limit=100)


def budget_scale(budget_s: float) -> BudgetScale:
    return QUICK_SCALE if budget_s < 240 else FULL_SCALE


# Model shapes the budget chooses from, smallest first: (n_layer, d_model, n_head, n_kv_head).
# All on the llama family (RMSNorm, RoPE, SwiGLU), which every export target understands.
MODEL_LADDER = (
    (2, 64, 2, 1), (2, 128, 4, 2), (4, 128, 4, 2), (4, 192, 4, 2), (4, 256, 4, 2), (6, 256, 4, 2),
    (6, 384, 6, 2), (8, 512, 8, 4), (12, 768, 12, 4), (16, 1024, 16, 4), (20, 1280, 20, 4),
    (24, 1536, 24, 8),
)

BASE_PROMPTS = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    \"\"\"A last-in, first-out container.\"\"\"\n\n    def __init__(self):\n",
)
CHAT_PROMPTS = (
    'Write the body of the Python function `fibonacci`.\n\ndef fibonacci(n):\n    """Return the n-th Fibonacci number."""',
    'Write the body of the Python function `utils.is_palindrome`.\n\ndef is_palindrome(text):\n    """Return True if text reads the same backwards."""',
    'Write the body of the Python function `files.count_lines`.\n\ndef count_lines(path):\n    """Return the number of lines in the file at path."""',
)


@dataclass
class SpeedrunOptions:
    out: str = DEFAULT_OUT
    minutes: float = DEFAULT_MINUTES
    data: list[str] = field(default_factory=lambda: [DEFAULT_DATA])
    preset: str = "auto"  # auto = sized to the budget; else a model preset used as it is
    device: str = "auto"  # auto | cpu | cuda
    tasks_dir: str | None = None
    seed: int = 0
    progress: bool = True

    def identity(self) -> dict:
        """The settings a finished stage depends on: a re-run must use the same ones."""
        return {"data": list(self.data), "preset": self.preset, "seed": self.seed}


# ---------------------------------------------------------------------------------------------
# State file and clock


class Speedrun:
    """One speedrun in RUN/: the state file, the clock, and the stages in order."""

    def __init__(self, options: SpeedrunOptions):
        self.opt = options
        self.out = Path(options.out)
        self.budget_s = float(options.minutes) * 60.0
        if self.budget_s <= 0:
            raise UserError(f"--minutes must be positive, got {options.minutes}")
        self.scale = budget_scale(self.budget_s)
        self.state = self._load_state()
        self._session_start = time.perf_counter()
        self._stage_start: float | None = None
        self._last_tick = 0.0

    # -- state ---------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    def _load_state(self) -> dict:
        if self.state_path.is_file():
            state = read_json(self.state_path, "speedrun state")
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise UserError(f"{self.state_path}: not a speedrun state file of version {STATE_VERSION}")
            if state.get("settings") != self.opt.identity():
                raise UserError(f"{self.out} holds a speedrun with other settings ({state.get('settings')}); "
                                "use a new --out or the same --data/--preset")
            state["budget_s"] = self.budget_s  # a re-run may give a new budget for what is left
            state["device"] = self.opt.device
            return state
        return {"version": STATE_VERSION, "settings": self.opt.identity(), "budget_s": self.budget_s,
                "device": self.opt.device, "tasks_dir": self.opt.tasks_dir, "stages": {}, "plan": {},
                "environment": environment_info(self.opt.device)}

    def save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path, self.state)

    def stage(self, name: str) -> dict:
        return self.state["stages"].setdefault(name, {})

    # -- clock ---------------------------------------------------------------------------------

    def spent_s(self) -> float:
        """Seconds spent in stages so far, over every session, including the running stage."""
        done = sum(float(s.get("seconds", 0.0)) for s in self.state["stages"].values())
        running = time.perf_counter() - self._stage_start if self._stage_start is not None else 0.0
        return done + running

    def left_s(self) -> float:
        return max(0.0, self.budget_s - self.spent_s())

    def say(self, message: str) -> None:
        if self.opt.progress:
            from tqdm import tqdm

            tqdm.write(f"speedrun: {message}", file=sys.stderr)

    def ticker(self, stage: str) -> Callable[[dict], None]:
        """An `on_step` callback: every 30 s, one line with the stage, the loss and the time left."""

        def tick(record: dict) -> None:
            now = time.perf_counter()
            if now - self._last_tick >= 30.0:
                self._last_tick = now
                loss = record.get("loss")
                self.say(f"[{stage}] step {record.get('step')}, loss {loss:.3f}; "
                         f"{fmt_duration(self.spent_s())} spent, {fmt_duration(self.left_s())} left")

        return tick

    # -- running stages -------------------------------------------------------------------------

    def run_stage(self, name: str, fn: Callable[[], dict]) -> dict:
        entry = self.stage(name)
        index = STAGES.index(name) + 1
        if entry.get("status") == "done":
            self.say(f"[{index}/{len(STAGES)} {name}] already done ({entry.get('seconds', 0):.0f} s); skipped")
            return entry
        resumed = entry.get("status") == "running"
        self.say(f"[{index}/{len(STAGES)} {name}] {'resuming' if resumed else 'starting'}; "
                 f"{fmt_duration(self.spent_s())} spent, {fmt_duration(self.left_s())} left of "
                 f"{fmt_duration(self.budget_s)}")
        entry["status"] = "running"
        self.save_state()
        self._stage_start = time.perf_counter()
        try:
            info = fn() or {}
        finally:  # an interrupted stage keeps the time it took, so the clock stays honest
            entry["seconds"] = float(entry.get("seconds", 0.0)) + time.perf_counter() - self._stage_start
            self._stage_start = None
            self.save_state()
        entry.update(info)
        entry["status"] = "done"
        self.save_state()
        return entry

    def run(self) -> Path:
        self.save_state()
        self.run_stage("tokenizer", self.stage_tokenizer)
        self.run_stage("data", self.stage_data)
        self.run_stage("pretrain", self.stage_pretrain)
        self.run_stage("sft", self.stage_sft)
        self.run_stage("dpo", self.stage_dpo)
        self.run_stage("eval", self.stage_eval)
        self.run_stage("quantize", self.stage_quantize)
        # the report is rebuilt on every run (cheap), so it always shows the latest files
        self.stage("report")["status"] = "pending"
        self.run_stage("report", self.stage_report)
        self.say(f"done in {fmt_duration(self.spent_s())}; report: {self.out / 'report.html'}")
        return self.out / "report.md"

    # -- paths ---------------------------------------------------------------------------------

    @property
    def tokenizer_dir(self) -> Path:
        return self.out / "tokenizer"

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def run_dir(self, name: str) -> Path:
        return self.out / name

    # -- 1. tokenizer ----------------------------------------------------------------------------

    def stage_tokenizer(self) -> dict:
        from scratchlm.data.sources import iter_texts
        from scratchlm.tokenizer import BPETokenizer

        plan = {"vocab_size": self.scale.vocab_size, "sample_bytes": self.scale.tokenizer_sample_bytes}
        texts, n_bytes = [], 0
        for text in iter_texts(self.opt.data):
            texts.append(text)
            n_bytes += len(text.encode("utf-8", "surrogatepass"))
            if n_bytes >= plan["sample_bytes"]:
                break
        if not texts:
            raise UserError(f"no text found in {', '.join(self.opt.data)}")
        tokenizer = BPETokenizer.train(texts, plan["vocab_size"], max_bytes=plan["sample_bytes"],
                                       progress=self.opt.progress)
        tokenizer.save(self.tokenizer_dir)
        return {"vocab_size": tokenizer.vocab_size, "sample_bytes": min(n_bytes, plan["sample_bytes"]),
                "sample_docs": len(texts), "tokens": 0}

    # -- 2. data ---------------------------------------------------------------------------------

    def stage_data(self) -> dict:
        from scratchlm.data.shards import prepare_dataset
        from scratchlm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_dir)
        dataset = prepare_dataset(self.opt.data, tokenizer, self.data_dir, dedup="exact", filters="default",
                                  val_fraction=0.02, seed=self.opt.seed, progress=self.opt.progress)
        if dataset.num_tokens("val") == 0 or dataset.num_tokens("train") == 0:
            raise UserError(f"{', '.join(self.opt.data)}: too little text for a train and a val split "
                            f"({dataset.num_docs('train')} + {dataset.num_docs('val')} documents kept)")
        stats = bytes_per_token(dataset, tokenizer)
        return {"tokens": dataset.num_tokens("train") + dataset.num_tokens("val"),
                "train_tokens": dataset.num_tokens("train"), "val_tokens": dataset.num_tokens("val"),
                "train_docs": dataset.num_docs("train"), "val_docs": dataset.num_docs("val"), **stats}

    # -- 3. pretrain -----------------------------------------------------------------------------

    def pretrain_seconds(self) -> float:
        reserved = self.budget_s * sum(POST_SHARES.values())
        return max(self.budget_s * 0.15, self.budget_s - self.spent_s() - reserved)

    def stage_pretrain(self) -> dict:
        from scratchlm.config import load_config
        from scratchlm.train.pretrain import pretrain

        if not self.state["plan"].get("pretrain"):
            self.state["plan"]["pretrain"] = self.plan_pretrain(self.pretrain_seconds())
            self.save_state()
        plan = self.state["plan"]["pretrain"]
        self.say(f"model {plan['shape']} ({plan['params']:,} parameters), {plan['max_steps']} steps of "
                 f"{plan['batch_tokens']:,} tokens planned in {plan['seconds']:.0f} s "
                 f"(probe: {plan['probe_tokens_per_sec']:,.0f} tokens/s)")
        config = load_config(None, base={"model": plan["model"], "train": plan["train"]})
        result = pretrain(self.data_dir, self.run_dir("base"), config, on_step=self.ticker("pretrain"))
        return finished(result, "pretrain")

    def plan_pretrain(self, seconds: float) -> dict:
        """The model, batch and step count that fit `seconds` of pretraining on this machine."""
        from scratchlm.model.accounting import flops_per_token, num_parameters
        from scratchlm.model.config import model_config
        from scratchlm.tokenizer import load_tokenizer
        from scratchlm.train.trainer import resolve_device, resolve_dtype

        device = resolve_device(self.opt.device)
        dtype = resolve_dtype("auto", device)
        vocab = load_tokenizer(self.tokenizer_dir).vocab_size
        gpu = device.type == "cuda"
        seq_len = 1024 if gpu else self.scale.seq_len
        micro = 32 if gpu else self.scale.micro_batch
        shapes = [ladder_config(shape, vocab, seq_len) for shape in MODEL_LADDER]
        if self.opt.preset != "auto":
            cfg = model_config(self.opt.preset, vocab_size=vocab)
            seq_len = min(seq_len, cfg.max_seq_len)
            shapes = [cfg]
        # effective FLOP/s of a mid-ladder model on this machine, as loaded as it is right now
        probe_cfg = shapes[min(len(shapes) - 1, 2 if not gpu else 8)]
        if seconds < 120:
            probe_cfg = shapes[0]
        probe_tok_s = measure_throughput(probe_cfg, micro, seq_len, device, dtype, self.scale.probe_steps)
        flops_s = probe_tok_s * flops_per_token(probe_cfg, seq_len)
        chosen = shapes[0]
        for cfg in shapes:
            tokens = flops_s * seconds / flops_per_token(cfg, seq_len)
            if tokens >= TOKENS_PER_PARAM * num_parameters(cfg):
                chosen = cfg
        # small models run below the probe's FLOP rate (overheads weigh more): measure the one chosen
        tok_s = probe_tok_s if chosen is probe_cfg else measure_throughput(chosen, micro, seq_len, device, dtype,
                                                                           self.scale.probe_steps)
        batch_tokens = micro * seq_len
        # 0.9: evaluation and checkpoints take a share of the wall time
        max_steps = max(5, int(tok_s * seconds * 0.9 / batch_tokens))
        lr = 2e-3 if chosen.d_model <= 256 else (1e-3 if chosen.d_model <= 512 else 6e-4)
        model = {"preset": chosen.preset, **{k: v for k, v in chosen.to_dict().items() if k != "preset"}}
        train = {
            "seq_len": seq_len, "micro_batch_size": micro, "max_steps": max_steps,
            "max_minutes": round(seconds * 1.1 / 60.0, 3), "lr": lr, "warmup_steps": max(5, max_steps // 30),
            "min_lr_ratio": 0.1, "schedule": "cosine", "weight_decay": 0.1, "dtype": "auto",
            "device": self.opt.device, "seed": self.opt.seed, "log_every": max(1, min(10, max_steps // 50)),
            "eval_every": max(10, max_steps // 8), "eval_batches": 4, "ckpt_every": max(10, max_steps // 5),
            "keep_checkpoints": 1, "tensorboard": False, "progress": self.opt.progress,
        }
        return {"model": model, "train": train, "seconds": seconds, "probe_tokens_per_sec": probe_tok_s,
                "probe_shape": shape_name(probe_cfg), "estimated_tokens_per_sec": tok_s,
                "shape": shape_name(chosen), "params": num_parameters(chosen),
                "non_embedding_params": num_parameters(chosen, non_embedding=True),
                "max_steps": max_steps, "batch_tokens": batch_tokens, "dtype": str(dtype).replace("torch.", ""),
                "device": str(device)}

    # -- 4. post-training ------------------------------------------------------------------------

    def _post_config(self, stage: str, seconds: float, pairs_per_step: float):
        from scratchlm.posttrain.pipeline import stage_config

        plan = self.state["plan"]["pretrain"]
        tok_s = plan["estimated_tokens_per_sec"]
        config = stage_config(stage)
        t = config.train
        t.seq_len = plan["train"]["seq_len"]
        t.micro_batch_size = plan["train"]["micro_batch_size"] if stage == "sft" else max(1, plan["train"]["micro_batch_size"] // 2)
        # SFT packs full windows; a DPO step holds 2 x micro answers of ~300 tokens, plus the
        # reference pass over the pairs used (one forward, ~1/3 of a training step)
        step_tokens = t.micro_batch_size * t.seq_len if stage == "sft" else 2 * t.micro_batch_size * 300 * 1.2
        t.max_steps = max(5, int(tok_s * seconds * 0.8 / step_tokens))
        t.max_minutes = round(seconds * 1.2 / 60.0, 3)
        t.lr = plan["train"]["lr"] if stage == "sft" else plan["train"]["lr"] / 40
        t.warmup_steps = max(2, t.max_steps // 20)
        t.eval_every = 0
        t.eval_batches = 8
        t.ckpt_every = max(5, t.max_steps // 4)
        t.keep_checkpoints = 1
        t.log_every = max(1, min(5, t.max_steps // 40))
        t.device = self.opt.device
        t.seed = self.opt.seed
        t.tensorboard = False
        t.progress = self.opt.progress
        section = config.sft if stage == "sft" else config.dpo
        if self.scale.posttrain_files:  # a short budget reads the pairs of a few stdlib files only
            section.data = [f"builtin:python-stdlib:files={self.scale.posttrain_files}"]
        if stage == "dpo":
            config.dpo.max_examples = int(t.max_steps * t.micro_batch_size * pairs_per_step) + 1
        return config

    def stage_sft(self) -> dict:
        from scratchlm.posttrain.pipeline import run_sft

        config = self._post_config("sft", self.budget_s * POST_SHARES["sft"], 1.0)
        result = run_sft(self.run_dir("base"), self.run_dir("sft"), config, on_step=self.ticker("sft"),
                         progress=self.opt.progress)
        return finished(result, "sft")

    def stage_dpo(self) -> dict:
        from scratchlm.posttrain.pipeline import run_dpo

        config = self._post_config("dpo", self.budget_s * POST_SHARES["dpo"], 1.0)
        result = run_dpo(self.run_dir("sft"), self.run_dir("dpo"), config, on_step=self.ticker("dpo"),
                         progress=self.opt.progress)
        return finished(result, "dpo")

    # -- 5. eval ---------------------------------------------------------------------------------

    def stage_eval(self) -> dict:
        eval_dir = self.out / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        summary = {}
        unigram_path = eval_dir / "unigram.json"
        if not unigram_path.is_file():
            from scratchlm.data.shards import Dataset
            from scratchlm.tokenizer import load_tokenizer

            dataset = Dataset.open(self.data_dir)
            docs = eval_documents(dataset, self.scale.eval_tokens)
            atomic_write_json(unigram_path, unigram_bpb(dataset, load_tokenizer(self.tokenizer_dir), docs))
        summary["unigram_bpb"] = read_json(unigram_path, "unigram eval")["bpb"]
        for name in ("base", "sft", "dpo"):
            path = eval_dir / f"{name}.json"
            if not path.is_file():  # one file per model, so an interrupted eval keeps what it did
                self.say(f"[eval] {name} model; {fmt_duration(self.left_s())} left")
                sft_logps = None
                if name == "dpo":
                    sft_logps = read_json(eval_dir / "sft.json", "sft eval")["preference"]["logps"]
                result = evaluate_model(self.run_dir(name), self.data_dir, self.scale, chat=name != "base",
                                        tasks_dir=self.opt.tasks_dir, reference_logps=sft_logps,
                                        device=self.opt.device)
                atomic_write_json(path, result)
            result = read_json(path, f"{name} eval")
            summary[name] = {"val_bpb": result["val_bpb"]["bpb"], "parse_rate": result["docstring"]["parse_rate"]}
        return {"models": summary, "tokens": 0}

    # -- 6. quantize -----------------------------------------------------------------------------

    def stage_quantize(self) -> dict:
        from scratchlm.data.shards import Dataset
        from scratchlm.model.quant import quantize_run
        from scratchlm.runs import load_run
        from scratchlm.train.trainer import resolve_device

        device = str(resolve_device(self.opt.device))
        source = self.run_dir("dpo")
        fp32 = read_json(self.out / "eval" / "dpo.json", "dpo eval")["val_bpb"]
        rows = [{"format": "fp32", "file_bytes": (source / "model.safetensors").stat().st_size,
                 "bpb": fp32["bpb"], "path": str(source)}]
        for bits in (8, 4):
            target = self.out / "quant" / f"int{bits}"
            report = quantize_run(source, target, bits=bits, group_size=64, progress=self.opt.progress)
            run = load_run(target, device=device)
            docs = eval_documents(Dataset.open(self.data_dir), self.scale.eval_tokens)
            bpb = model_bpb(run.model, run.tokenizer, docs)
            rows.append({"format": f"int{bits}", "file_bytes": report.file_bytes, "bpb": bpb["bpb"],
                         "memory_bytes": report.memory_bytes, "group_size": report.group_size if bits == 4 else None,
                         "path": str(target)})
        atomic_write_json(self.out / "quant" / "quant.json", {"rows": rows})
        return {"rows": len(rows), "tokens": 0}

    # -- 7. report -------------------------------------------------------------------------------

    def stage_report(self) -> dict:
        self.stage("report")["seconds"] = 0.0  # rebuilt each time: count only the latest build
        report = build_report(self.out, self.state)
        report.write(self.out)
        return {"tokens": 0}


# ---------------------------------------------------------------------------------------------
# Pieces the stages use (each callable on its own)


def finished(result, stage: str) -> dict:
    """A training stage's figures; a run stopped by a signal is not finished (re-running resumes it)."""
    if result.stopped == "signal":
        raise KeyboardInterrupt(f"{stage} stopped by a signal at step {result.step}")
    return {"steps": result.step, "tokens": result.tokens, "stopped": result.stopped,
            "final_loss": result.last_loss, **(result.last_eval or {})}


def ladder_config(shape: tuple[int, int, int, int], vocab_size: int, seq_len: int):
    from scratchlm.model.config import model_config

    n_layer, d_model, n_head, n_kv_head = shape
    return model_config("llama-mini", vocab_size=vocab_size, n_layer=n_layer, d_model=d_model,
                        n_head=n_head, n_kv_head=n_kv_head, d_ff=None, max_seq_len=seq_len)


def shape_name(cfg) -> str:
    return f"{cfg.n_layer}x{cfg.d_model} ({cfg.n_head} heads)"


def measure_throughput(cfg, micro_batch: int, seq_len: int, device, dtype, steps: int = 3) -> float:
    """Training tokens per second of `cfg` here and now: a few steps on random tokens, through
    the same loss, optimizer, precision context and CPU workers the trainer uses (so the plan is
    not skewed by a slower stand-in: a small model's speed is mostly overheads the trainer has cut)."""
    import torch

    from scratchlm.config import TrainConfig
    from scratchlm.model.transformer import Transformer
    from scratchlm.train.optim import build_optimizer
    from scratchlm.train.trainer import Strategy, autocast_context, make_cpu_workers, thread_autocast

    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    train_cfg = TrainConfig(lr=1e-4, micro_batch_size=micro_batch)
    optimizer = build_optimizer(model, train_cfg)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device)
    batch, task = (tokens[:, :-1], tokens[:, 1:]), _ProbeTask()
    params = [p for p in model.parameters() if p.requires_grad]
    workers = make_cpu_workers(train_cfg, model, task, device, Strategy(), None, params)

    def step():
        with autocast_context(device, dtype):
            if workers is not None:
                workers.forward_backward(model, task, batch, 1.0, lambda: thread_autocast(device, dtype))
            else:
                loss = task.loss(model, batch)[0]
        if workers is None:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        step()  # warm-up: allocation and kernel selection
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * micro_batch * seq_len / (time.perf_counter() - start)
    finally:
        if workers is not None:
            workers.close()


class _ProbeTask:
    """The pretraining loss on fixed random windows, for the throughput probe."""

    def split_batch(self, batch, parts: int) -> list[tuple]:
        from scratchlm.train.cpu_workers import split_rows

        return split_rows(batch, parts)

    def loss(self, model, batch):
        from scratchlm.train.pretrain import next_token_loss_fused

        inputs, targets = batch
        return next_token_loss_fused(model, inputs, targets), {}, targets.numel()


def bytes_per_token(dataset, tokenizer) -> dict:
    """Bytes of text per token over the train split (special tokens left out)."""
    import numpy as np

    from scratchlm.train.pretrain import token_byte_lengths

    lengths = token_byte_lengths(tokenizer, dataset.vocab_size).numpy()
    n_bytes = n_tokens = 0
    for shard in dataset.shard_arrays("train"):
        per_token = lengths[np.asarray(shard, dtype=np.int64)]
        n_bytes += int(per_token.sum())
        n_tokens += int((per_token > 0).sum())
    return {"bytes_per_token": n_bytes / max(1, n_tokens), "train_text_bytes": n_bytes}


def eval_documents(dataset, max_tokens: int) -> list[list[int]]:
    """The val documents (end-of-text removed), cut so that together they hold `max_tokens` tokens.

    Every model and the unigram baseline are scored on exactly these tokens.
    """
    docs, total = [], 0
    for doc in dataset.iter_documents("val"):
        ids = [int(t) for t in doc if int(t) != dataset.eot_id][: max_tokens - total]
        if ids:
            docs.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    if not docs:
        raise UserError(f"{dataset.path if hasattr(dataset, 'path') else 'dataset'}: no val documents to score")
    return docs


def model_bpb(model, tokenizer, docs: list[list[int]]) -> dict:
    """Bits per byte of `docs` under the model (windows of its context, no overlap)."""
    import torch

    from scratchlm.eval.bpb import bits_per_byte_tokens

    window = model.config.max_seq_len
    with torch.no_grad():
        result = bits_per_byte_tokens(model, tokenizer, docs, stride=window)
    return {"bpb": result.bpb, "tokens": result.tokens, "bytes": result.bytes, "documents": result.documents}


def unigram_bpb(dataset, tokenizer, docs: list[list[int]]) -> dict:
    """Bits per byte of `docs` under a unigram model of the train split.

    The unigram model is the train tokens' frequencies, add-one smoothed, with end-of-text and
    other special tokens left out of the distribution (which only flatters the baseline).
    """
    import numpy as np

    from scratchlm.train.pretrain import token_byte_lengths

    lengths = token_byte_lengths(tokenizer, dataset.vocab_size).numpy()
    counts = np.zeros(dataset.vocab_size, dtype=np.float64)
    for shard in dataset.shard_arrays("train"):
        counts += np.bincount(np.asarray(shard, dtype=np.int64), minlength=dataset.vocab_size)[: dataset.vocab_size]
    text_ids = lengths > 0
    counts = (counts + 1.0) * text_ids
    log2p = np.full(dataset.vocab_size, -np.inf)
    log2p[text_ids] = np.log2(counts[text_ids] / counts.sum())
    ids = np.asarray([t for doc in docs for t in doc], dtype=np.int64)
    ids = ids[lengths[ids] > 0]
    n_bytes = int(lengths[ids].sum())
    return {"bpb": float(-log2p[ids].sum() / max(1, n_bytes)), "tokens": int(ids.size), "bytes": n_bytes,
            "documents": len(docs)}


def body_parses(answer: str) -> bool:
    """Whether a function body (any indentation) is non-empty Python that `ast.parse` accepts."""
    body = textwrap.dedent(answer).strip("\n")
    if not body.strip():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse("def f():\n" + textwrap.indent(body, "    ", lambda line: True))
        return True
    except (SyntaxError, ValueError):
        return False


def base_answer(continuation: str, hit_length: bool) -> str:
    """The body a base model wrote after a signature and docstring: up to the next top-level line."""
    lines = []
    for line in continuation.split("\n"):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines)  # the function ended; the model went on with something else
        lines.append(line)
    if hit_length and len(lines) > 1:
        lines = lines[:-1]  # the last line was cut by the token limit
    return "\n".join(lines)


def base_function_ended(continuation: str) -> bool:
    """Whether a base model's continuation left the function (a top-level line followed it)."""
    return any(line.strip() and not line[0].isspace() for line in continuation.split("\n"))


def chat_answer(text: str, hit_length: bool) -> str:
    lines = text.split("\n")
    if hit_length and len(lines) > 1:
        lines = lines[:-1]
    return "\n".join(lines)


def evaluate_model(run_dir: Path, data_dir: Path, scale: BudgetScale = FULL_SCALE, *, chat: bool,
                   tasks_dir: str | None = None,
                   reference_logps: list | None = None, device: str = "auto") -> dict:
    """Every figure the report shows for one model, as a JSON-able dict."""
    import torch

    from scratchlm.data.shards import Dataset
    from scratchlm.infer.api import LM
    from scratchlm.posttrain.chat_template import chat_stop_ids, render_chat
    from scratchlm.posttrain.common import prepare_chat_vocab
    from scratchlm.posttrain.defaults import (
        default_pairs,
        split_examples,
        stdlib_functions,
        to_conversation,
    )
    from scratchlm.posttrain.dpo import build_pair_examples, compute_reference_logps
    from scratchlm.posttrain.sft import SFTTask, build_examples
    from scratchlm.runs import load_run
    from scratchlm.train.trainer import resolve_device

    dev = resolve_device(device)
    run = load_run(run_dir, device=str(dev))
    model, tokenizer = run.model, run.tokenizer
    out: dict[str, Any] = {"run": str(run_dir), "params": model.num_parameters()}
    start = time.perf_counter()
    out["val_bpb"] = model_bpb(model, tokenizer, eval_documents(Dataset.open(data_dir), scale.eval_tokens))

    # held-out fine-tuning data: the base model gets the chat tokens (in memory only) to be scored
    prepare_chat_vocab(model, tokenizer)
    model.to(dev)
    seq_len = model.config.max_seq_len
    heldout = split_examples(stdlib_functions(scale.posttrain_files), heldout=True)
    convs = [to_conversation(ex) for ex in heldout[:scale.heldout]]
    examples, _ = build_examples(tokenizer, convs, seq_len)
    pad = tokenizer.eot_id or 0
    if examples:
        task = SFTTask(examples, examples, seq_len, 8, pad, packing=False, device=dev)
        out["sft_heldout"] = {**task.evaluate(model), "conversations": len(examples)}
    pairs = default_pairs(heldout)[:scale.heldout]
    pair_examples, _ = build_pair_examples(tokenizer, pairs, seq_len)
    logps = compute_reference_logps(model, pair_examples, 8, pad, dev)
    preference = {"pairs": len(pair_examples), "logps": logps.tolist(),
                  "accuracy": float((logps[:, 0] > logps[:, 1]).float().mean()) if len(pair_examples) else None}
    if reference_logps is not None and len(reference_logps) == len(pair_examples):
        ref = torch.tensor(reference_logps)
        margin = (logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])
        preference["reward_accuracy"] = float((margin > 0).float().mean())
        preference["reward_margin"] = float(margin.mean())
    out["preference"] = preference

    # docstring -> Python that parses, and samples for fixed prompts: one batched generation
    lm = LM(model, tokenizer)
    chosen = heldout[:scale.parse_prompts]
    fixed = CHAT_PROMPTS if chat else BASE_PROMPTS
    if chat:
        prompts = [render_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True).ids
                   for text in [ex.instruction for ex in chosen] + list(fixed)]
        completions = lm.complete(prompts, max_new_tokens=scale.parse_max_tokens, stop_ids=chat_stop_ids(tokenizer),
                                  overflow="truncate")
        extract = chat_answer
    else:
        prompts = [base_prompt(ex) for ex in chosen] + list(fixed)
        completions = lm.complete(prompts, max_new_tokens=scale.parse_max_tokens, overflow="truncate")
        extract = base_answer
    answers = [extract(c.text, c.finish_reason == "length") for c in completions[:len(chosen)]]
    parsed = [body_parses(a) for a in answers]
    # stricter: the model also ended the answer itself (a degenerate repetition cut by the token
    # limit can parse, e.g. `x = x = x = ...`)
    ended = [c.finish_reason == "stop" or (not chat and base_function_ended(c.text))
             for c in completions[:len(chosen)]]
    complete = [p and e for p, e in zip(parsed, ended)]
    out["docstring"] = {
        "prompts": len(chosen), "parsed": sum(parsed), "parse_rate": sum(parsed) / max(1, len(chosen)),
        "complete_parsed": sum(complete), "complete_parse_rate": sum(complete) / max(1, len(chosen)),
        "max_new_tokens": scale.parse_max_tokens,
        "examples": [{"function": ex.qualname, "answer": a, "parses": p}
                     for ex, a, p in list(zip(chosen, answers, parsed))[:3]],
    }
    out["samples"] = [{"prompt": p, "completion": c.text} for p, c in zip(fixed, completions[len(chosen):])]

    if tasks_dir:
        from scratchlm.eval.tasks import evaluate_suite

        out["suite"] = evaluate_suite(model, tokenizer, tasks_dir, limit=scale.suite_limit)
    out["seconds"] = time.perf_counter() - start
    return out


def base_prompt(example) -> str:
    """A held-out function as the base model saw code in pretraining: signature and docstring."""
    doc = textwrap.indent(example.docstring, "    ").lstrip()
    return f'{example.signature}\n    """{doc}"""\n'


def environment_info(device: str) -> dict:
    import torch

    from scratchlm import __version__

    info = {
        "scratchlm": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "cpu": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "requested_device": device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from scratchlm.train.trainer import cpu_has_native_bf16

        info["cpu_native_bf16"] = cpu_has_native_bf16()
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# The report card: every figure read back from the run's files


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return records


def _curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _load_optional(path: Path, what: str) -> dict | None:
    return read_json(path, what) if path.is_file() else None


def summary_rows(out: Path, state: dict) -> list[list[Any]]:
    """The headline figures, each read from the run's files (state, eval and quantization JSON)."""
    stages = state.get("stages", {})
    plan = state.get("plan", {}).get("pretrain", {})
    evals = {name: _load_optional(out / "eval" / f"{name}.json", f"{name} eval") for name in ("base", "sft", "dpo")}
    quant = _load_optional(out / "quant" / "quant.json", "quantization table") or {"rows": []}
    spent = sum(float(s.get("seconds", 0.0)) for s in stages.values())
    rows = [
        ["wall time (all stages)", fmt_duration(spent) + f" (budget {fmt_duration(state.get('budget_s', 0))})"],
        ["model", f"{plan.get('shape', '?')}, {plan.get('params', 0):,} parameters"],
        ["pretraining tokens", stages.get("pretrain", {}).get("tokens")],
        ["tokenizer bytes per token", stages.get("data", {}).get("bytes_per_token")],
        ["unigram model val bpb", (_load_optional(out / "eval" / "unigram.json", "unigram eval") or {}).get("bpb")],
    ]
    for name in ("base", "sft", "dpo"):
        if evals[name]:
            rows.append([f"{name} model val bpb", evals[name]["val_bpb"]["bpb"]])
    for name in ("base", "sft", "dpo"):
        if evals[name]:
            d = evals[name]["docstring"]
            rows.append([f"{name} model: docstring -> Python that parses", f"{d['parsed']}/{d['prompts']} ({d['parse_rate']:.0%})"
                         + (f"; ended by the model and parses: {d['complete_parsed']}/{d['prompts']}"
                            if "complete_parsed" in d else "")])
    if evals["dpo"] and "reward_accuracy" in evals["dpo"]["preference"]:
        rows.append(["DPO reward accuracy (held-out pairs)", evals["dpo"]["preference"]["reward_accuracy"]])
    for row in quant["rows"]:
        rows.append([f"{row['format']}: size / val bpb", f"{row['file_bytes'] / 2**20:.2f} MiB / {row['bpb']:.4f}"])
    return rows


def build_report(out: Path, state: dict):
    """The speedrun's report card (a `scratchlm.report.Report`), with its PNG plots written."""
    from scratchlm.report import Report, line_plot, token_pieces
    from scratchlm.tokenizer import load_tokenizer

    out = Path(out)
    stages = state.get("stages", {})
    plan = state.get("plan", {}).get("pretrain", {})
    report = Report("scratchlm speedrun", intro=f"Run directory: {out}. Every figure below is read from "
                    "the files in it (speedrun.json, */metrics.jsonl, eval/*.json, quant/quant.json).")

    report.section("Summary").table(["what", "value"], summary_rows(out, state))

    s = report.section("Configuration")
    s.key_values([("data", ", ".join(state["settings"]["data"])), ("preset", state["settings"]["preset"]),
                  ("budget", fmt_duration(state.get("budget_s", 0))), ("device", plan.get("device")),
                  ("training dtype", plan.get("dtype")), ("seed", state["settings"]["seed"]),
                  ("tasks dir", state.get("tasks_dir"))])
    if plan:
        s.paragraph(f"Model sized to the budget: {plan['shape']}, {plan['params']:,} parameters "
                    f"({plan['non_embedding_params']:,} outside the embeddings). A throughput probe on "
                    f"{plan['probe_shape']} measured {plan['probe_tokens_per_sec']:,.0f} training tokens/s; "
                    f"{plan['seconds']:.0f} s of pretraining were planned as {plan['max_steps']} steps of "
                    f"{plan['batch_tokens']:,} tokens.")
        s.code(json.dumps({"model": plan["model"], "train": plan["train"]}, indent=2), "json", "pretraining config")

    env = state.get("environment", {})
    report.section("Environment").key_values(list(env.items()))

    rows = []
    for name in STAGES[:-1]:  # the report stage is this very build
        entry = stages.get(name, {})
        rows.append([name, entry.get("status", "not run"), round(float(entry.get("seconds", 0.0)), 1),
                     entry.get("tokens") or None, entry.get("steps")])
    report.section("Time and tokens per stage").table(
        ["stage", "status", "seconds", "tokens", "steps"], rows,
        "seconds: wall clock summed over every session of this run; tokens: tokenized (data) or trained on")

    s = report.section("Training curves")
    plots = out / "plots"
    for name in ("base", "sft", "dpo"):
        records = _read_metrics(out / name / "metrics.jsonl")
        label = {"base": "pretraining", "sft": "SFT", "dpo": "DPO"}[name]
        loss = line_plot(plots / f"{name}_loss.png", {"train loss": _curve(records, "loss"),
                                                      "val loss": _curve(records, "val_loss")},
                         "step", "loss (nats/token)", f"{label} loss")
        lr = line_plot(plots / f"{name}_lr.png", {"learning rate": _curve(records, "lr")}, "step", "learning rate",
                       f"{label} learning rate")
        if loss:
            s.image(f"plots/{name}_loss.png", f"{label} loss")
        if lr:
            s.image(f"plots/{name}_lr.png", f"{label} learning rate")
        if records:
            last = records[-1]
            s.paragraph(f"{label}: {last.get('step')} steps, {last.get('tokens', 0):,} tokens, last loss "
                        f"{last.get('loss', float('nan')):.4f}, {last.get('tokens_per_sec', 0):,.0f} tokens/s.")

    s = report.section("Tokenizer")
    tok_info, data_info = stages.get("tokenizer", {}), stages.get("data", {})
    s.key_values([("vocabulary", tok_info.get("vocab_size")), ("trained on (bytes)", tok_info.get("sample_bytes")),
                  ("bytes per token (train split)", data_info.get("bytes_per_token"))])
    if (out / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(out / "tokenizer")
        sample = BASE_PROMPTS[0] + "    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
        pieces = token_pieces(tokenizer, sample)
        s.tokens(pieces, f"{len(pieces)} tokens for {len(sample.encode())} bytes")

    s = report.section("Data")
    s.table(["split", "documents", "tokens"], [["train", data_info.get("train_docs"), data_info.get("train_tokens")],
                                               ["val", data_info.get("val_docs"), data_info.get("val_tokens")]])
    index = _load_optional(out / "data" / "index.json", "dataset index")
    if index and isinstance(index.get("stats"), dict):
        removed = index["stats"].get("removed", {})
        if removed:
            s.table(["removed by", "documents", "bytes"],
                    [[k, v.get("docs"), v.get("bytes")] if isinstance(v, dict) else [k, v, None]
                     for k, v in sorted(removed.items())])

    evals = {name: _load_optional(out / "eval" / f"{name}.json", f"{name} eval") for name in ("base", "sft", "dpo")}
    s = report.section("Evaluation")
    unigram = _load_optional(out / "eval" / "unigram.json", "unigram eval") or {}
    rows = [["unigram model (train-split token frequencies)", unigram.get("bpb"), None, None, None]]
    for name, ev in evals.items():
        if ev:
            pref = ev["preference"]
            rows.append([name, ev["val_bpb"]["bpb"], (ev.get("sft_heldout") or {}).get("val_loss"),
                         pref.get("accuracy"), pref.get("reward_accuracy")])
    s.table(["model", "val bits/byte", "held-out SFT loss", "pair accuracy (log p chosen > rejected)",
             "DPO reward accuracy (vs SFT)"], rows,
            f"val bits/byte on the same {unigram.get('tokens', 0):,} val tokens for every row; held-out: "
            "stdlib functions no fine-tuning stage trained on")
    suites = {name: ev["suite"] for name, ev in evals.items() if ev and ev.get("suite")}
    if suites:
        labels = sorted({label for suite in suites.values() for label in suite["tasks"]})
        s.table(["task"] + list(suites), [[label] + [suite["tasks"].get(label, {}).get("accuracy") for suite in suites.values()]
                                          for label in labels] + [["suite score (centered)"] + [suite.get("suite_score") for suite in suites.values()]],
                "benchmark suite (--tasks-dir): accuracy")

    s = report.section("Docstring to Python")
    s.paragraph("Each model is asked to implement held-out standard-library functions from their signature and "
                "docstring (the base model as raw code, the chat models through the chat template); an answer "
                "counts when it is a non-empty body that ast.parse accepts (an answer cut by the token limit "
                "loses its last, partial line). The stricter count also asks that the model ended the answer "
                "itself (end token, or the base model leaving the function), since a degenerate repetition "
                "can parse.")
    s.table(["model", "prompts", "parses", "rate", "ended by the model and parses"],
            [[name, ev["docstring"]["prompts"], ev["docstring"]["parsed"], ev["docstring"]["parse_rate"],
              ev["docstring"].get("complete_parsed")] for name, ev in evals.items() if ev])
    for name in ("base", "dpo"):
        if evals[name] and evals[name]["docstring"]["examples"]:
            ex = evals[name]["docstring"]["examples"][0]
            s.code(ex["answer"], "python", f"{name} model, {ex['function']} (parses: {'yes' if ex['parses'] else 'no'})")

    s = report.section("Samples")
    for name, title in (("base", "base model"), ("dpo", "chat model (DPO)")):
        if evals[name]:
            for sample in evals[name]["samples"]:
                s.code(sample["prompt"] + "\n--->\n" + sample["completion"], "", f"{title}, greedy")

    quant = _load_optional(out / "quant" / "quant.json", "quantization table")
    s = report.section("Quantization")
    if quant:
        s.table(["format", "file size (MiB)", "val bits/byte", "run dir"],
                [[r["format"], r["file_bytes"] / 2**20, r["bpb"], r["path"]] for r in quant["rows"]])

    s = report.section("Use it")
    chat_dir = out / "dpo"
    s.code("\n".join([
        f"scratchlm chat --model {chat_dir}",
        f"scratchlm serve --model {chat_dir}    # OpenAI-compatible API and a web chat page on http://127.0.0.1:8000",
        f"scratchlm chat --model {out / 'quant' / 'int4'}",
        f"scratchlm eval --model {chat_dir} --bpb {out / 'data'}",
        f"python -c \"import scratchlm; print(scratchlm.load('{chat_dir}').chat([{{'role': 'user', 'content': 'hi'}}]))\"",
    ]), "sh")
    return report


# ---------------------------------------------------------------------------------------------
# Python API and CLI


def speedrun(out: str | os.PathLike = DEFAULT_OUT, minutes: float = DEFAULT_MINUTES,
             data: str | list[str] | None = None, preset: str = "auto", device: str = "auto",
             tasks_dir: str | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Run (or finish) the whole pipeline into `out`; returns the path of report.md."""
    specs = [data] if isinstance(data, str) else list(data or [DEFAULT_DATA])
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise UserError(f"--tasks-dir: not a directory: {tasks_dir}")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    options = SpeedrunOptions(out=str(out), minutes=float(minutes), data=specs, preset=preset,
                              device=device, tasks_dir=str(tasks_dir) if tasks_dir else None,
                              seed=seed, progress=progress)
    if preset != "auto":
        from scratchlm.model.config import PRESETS

        if preset not in PRESETS:
            raise UserError(f"--preset: unknown preset {preset!r} (auto, or one of {', '.join(PRESETS)})")
    return Speedrun(options).run()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "speedrun", help="the whole pipeline in one command, within a time budget, with a report card",
        description="Train a tokenizer, prepare data, pretrain a model sized to the budget, fine-tune "
        "(SFT) and align (DPO) it, evaluate, quantize, and write RUN/report.md and report.html. "
        "Re-running with the same --out skips finished stages and resumes an interrupted one.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help=f"time budget for the whole run (default {DEFAULT_MINUTES:g})")
    p.add_argument("--data", action="append", default=None, metavar="SRC",
                   help=f"text source (repeatable; default {DEFAULT_DATA}): .txt/.jsonl/.parquet, a directory, hf:NAME")
    p.add_argument("--preset", default="auto", help="model preset, or auto (sized to the budget; default)")
    p.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--tasks-dir", default=None, metavar="DIR", help="benchmark suite to evaluate (tasks.json + JSONL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    report = speedrun(args.out, args.minutes, args.data, args.preset, args.device, args.tasks_dir,
                      args.seed, progress=not args.quiet)
    print(report)
    return 0
