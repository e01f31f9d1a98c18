"""The ``searcher`` command. Only this module writes to the console."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from searcher.errors import SearcherError
from searcher.export import FORMATS
from searcher.spec import GROUPS, KINDS, PLACEMENT, RunSpec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit status 2, no usage dump
        self.exit(2, f"searcher: error: {message} (see `{self.prog} --help`)\n")

    def format_help(self) -> str:
        """Help with the names it lists filled in (``{spaces}`` etc.) from the registries."""
        templates = [a for a in self._actions if a.help and "{" in a.help]
        names = _registry_names() if templates else {}
        for action in templates:
            action.help = action.help.format(**names, **_action_names(action))
        return super().format_help()


def _registry_names() -> dict[str, str]:
    """The names help texts list, each from its registry (imported only to show help)."""
    import spaces
    from latency_models.backends import BACKENDS
    from searcher.algorithms import ALGORITHMS, SEEDS
    from searcher.budget import ABSOLUTE, KEYS
    from searcher.models import DTYPES

    defaults = RunSpec()
    algorithms = ALGORITHMS.items()
    baselines = [f"{n} ({a.spaces})" if a.spaces else n for n, a in algorithms if a.baseline]
    budgets = ", ".join(f"{key}=R" for key in KEYS)
    absolute = ", ".join(f"{key}=X" for key in ABSOLUTE)
    return {
        "spaces": " | ".join(spaces.SPACES),
        "searches": _listing([n for n, a in algorithms if not a.baseline], defaults.algo),
        "baselines": " | ".join(baselines),
        "seeds": _listing(list(SEEDS), defaults.init),
        "multi_objective": "/".join(n for n, a in algorithms if a.multi_objective),
        "budgets": f"{budgets} (R: a fraction of dense), {absolute}",
        "dtypes": " | ".join(DTYPES),
        "latency_devices": " | ".join(BACKENDS),
        "families": _families(),
    }


def _action_names(action: argparse.Action) -> dict[str, str]:
    """A run setting's own names for its help: its default, the algorithms that read it."""
    from searcher.algorithms import ALGORITHMS

    readers = ", ".join(n for n, a in ALGORITHMS.items() if action.dest in a.reads)
    return {"default": str(getattr(RunSpec(), action.dest, "")), "readers": readers}


def _listing(names: list[str], default: str) -> str:
    return " | ".join(f"{n} (default)" if n == default else n for n in names)


def _families() -> str:
    """The model families searcher supports, for --model's help."""
    try:
        from searcher.families import FAMILIES
    except ImportError:  # a checkout from before the family registry
        return ""
    listed = []
    for name, family in FAMILIES.items():
        types = tuple(getattr(family, "model_types", ()))
        listed.append(f"{name} ({', '.join(types)})" if types not in ((), (name,)) else name)
    return f"; supported families: {', '.join(listed)}"


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """A flag for every run setting, as ``RunSpec`` declares it (``searcher.spec.setting``).

    Flags left out leave the setting unset (``SUPPRESS``), so a config file's value stands.
    """
    groups = {name: parser.add_argument_group(name, text) for name, text in GROUPS.items()}
    for f in dataclasses.fields(RunSpec):
        options = dict(f.metadata["flag"])
        option = options.pop("option", f"--{f.name.replace('_', '-')}")
        group = groups[f.metadata["group"]] if f.metadata["group"] else parser
        group.add_argument(
            option, dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"],
            **_parsing(KINDS[f.name]), **options,
        )  # fmt: skip


def _parsing(kind: type) -> dict[str, Any]:
    """How a flag parses a setting of type ``kind``."""
    if kind is bool:
        return {"action": "store_true"}
    if kind is dict:  # repeated KEY=VALUE
        return {"action": "append", "type": _space_option}
    return {"type": kind} if kind in (int, float) else {}


def _space_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser = _Parser(
        prog="searcher",
        description="Search per-layer width, depth or sparsity allocations of a pretrained "
        "causal LM under a FLOPs / parameter / sparsity budget.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", parents=[common], help="search per-layer allocations under a budget")
    s = argparse.SUPPRESS
    r.add_argument("--config", default=s, help="YAML/JSON file of run settings (flags win)")
    r.add_argument("--resume", default=s, metavar="RUN_DIR",
                   help="continue an interrupted run with its own settings")  # fmt: skip
    _add_settings(r)

    j = sub.add_parser(
        "submit", parents=[common],
        help="run a searcher command on a Ray cluster as a Ray job",
        description="Submit `searcher ARGS` as a Ray job: searcher's code, this directory "
        "and searcher's pinned requirements travel as the job's runtime environment.",
    )  # fmt: skip
    j.add_argument("--address", required=True, metavar="URL",
                   help="the cluster's dashboard, e.g. http://HEAD:8265")  # fmt: skip
    j.add_argument("--working-dir", default=".", help="shipped as the job's working directory")
    j.add_argument("--no-requirements", action="store_true",
                   help="the cluster has searcher's dependencies: ship no pip list")  # fmt: skip
    j.add_argument("--wait", action="store_true", help="print the job's logs until it ends")
    j.add_argument("args", nargs=argparse.REMAINDER, metavar="-- run ARGS",
                   help="the searcher command to run")  # fmt: skip

    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="ort-cpu", help="{latency_devices}")
    device.add_argument("--batch", type=int, default=1, help="workload batch B (default 1)")
    device.add_argument("--seq", type=int, default=128,
                        help="prefill length / decode KV-cache length S (default 128)")  # fmt: skip
    device.add_argument("--threads", type=int, help="threads to run with (default: every core)")
    device.add_argument("--model", help="local HF model directory (default: embedded)")
    device.add_argument("--trust-remote-code", action="store_true")
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--space", default="width", help="{spaces}")
    shape.add_argument(
        "--space-option", dest="space_options", action="append", type=_space_option,
        default=[], metavar="KEY=VALUE", help="space setting, e.g. mlp_steps=8 (repeatable)",
    )  # fmt: skip
    shape.add_argument("--data", help="text to rank units on (default: pydoc)")

    p = sub.add_parser(
        "profile", parents=[common, device, shape],
        help="build a latency table of a model's blocks on a device",
        description="Time every block size of the space, the fixed parts and a few whole "
        "models on the device, and save the latency table with the device's fingerprint.",
    )  # fmt: skip
    p.add_argument(
        "--out", help="table path (default results/latency/<model>-<device>-b<B>-s<S>.json)"
    )
    p.add_argument("--corrections", type=int, default=8,
                   help="whole models measured to fit the correction (default 8)")  # fmt: skip
    p.add_argument(
        "--method", choices=("context", "stack"), default="stack",
        help="how a block size is timed: as a stack of that kind's blocks alone (stack, "
        "default), or MLP sizes after whole attention blocks (context)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)

    lt = sub.add_parser(
        "latency", parents=[common], help="validate a latency table, or measure a config"
    )
    ls = lt.add_subparsers(dest="latency_command", required=True, parser_class=_Parser)
    v = ls.add_parser(
        "validate", parents=[common, device, shape],
        help="predicted against measured latency of random candidates",
    )  # fmt: skip
    v.add_argument("--n", type=int, default=100, help="candidates (default 100)")
    v.add_argument("--table", help="latency table (default: this model and device's)")
    v.add_argument("--workload", choices=("prefill", "decode"), help="default: both")
    v.add_argument("--out", help="directory for validation.json and validation.png")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--allow-table-mismatch", action="store_true")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    m = ls.add_parser(
        "measure", parents=[common, device],
        help="measure a saved config (best.json / pareto.json) and the dense model",
    )  # fmt: skip
    m.add_argument("config", help="best.json, or pareto.json with --pick")
    m.add_argument("--pick", type=int, help="entry of pareto.json (default 0)")
    m.add_argument("--table", help="latency table, for predictions beside the measurements")
    m.add_argument("--allow-table-mismatch", action="store_true")
    m.add_argument("--json", action="store_true", help="print the result as JSON")

    x = sub.add_parser(
        "export", parents=[common], help="write a run's chosen config in a downstream format"
    )
    x.add_argument("run_dir", metavar="RUN_DIR")
    x.add_argument("--format", required=True, choices=FORMATS)
    x.add_argument("--pick", default="best", help="best (default) or an index into pareto.json")
    x.add_argument("--under", metavar="BUDGET",
                   help="the lowest-KL front config meeting e.g. flops=0.5")  # fmt: skip
    x.add_argument("--out", required=True, help="directory (pruned, onnx) or file (the rest)")
    x.add_argument("--model", help="model directory, if it moved since the run")
    x.add_argument("--trust-remote-code", action="store_true")
    a = sub.add_parser("apply", parents=[common], help="prune a model straight from a config file")
    a.add_argument("config", help="a canonical config (export --format json), best.json, or "
                   "pareto.json with --pick")  # fmt: skip
    a.add_argument("--out", required=True, help="directory (pruned, onnx) or file (the rest)")
    a.add_argument("--format", default="pruned", choices=FORMATS)
    a.add_argument("--pick", type=int, help="entry of pareto.json")
    a.add_argument("--model", help="the model the config was made for, if not where it was")
    a.add_argument("--trust-remote-code", action="store_true")

    e = sub.add_parser(
        "eval", parents=[common],
        help="score a config, a run, or a pruned or healed model directory against the dense model",
    )  # fmt: skip
    e.add_argument("config", metavar="PATH",
                   help="best.json, pareto.json with --pick, a run directory, or a model "
                   "directory written by export --format pruned or heal")  # fmt: skip
    e.add_argument("--data", help=".txt or .jsonl (default: the run's validation windows)")
    e.add_argument("--pick", type=int, help="entry of pareto.json (default 0)")
    e.add_argument("--windows", type=int, default=8, help="max windows of --data to score")
    e.add_argument("--model", help="model directory, if it moved since the run")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", help="default: the run's dtype")
    e.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_heal(sub, common)
    return parser


def _add_heal(sub: Any, common: argparse.ArgumentParser) -> None:
    from searcher.heal_settings import HealSettings

    d = HealSettings()
    h = sub.add_parser(
        "heal", parents=[common],
        help="distil a pruned config from the dense model and write the healed model",
        description="Knowledge distillation (KL on logits) of a config's pruned model from "
        "the dense model on calibration text; writes a pruned export and heal.json.",
    )  # fmt: skip
    h.add_argument("source", metavar="RUN_DIR|CONFIG",
                   help="a run directory, best.json, pareto.json or a canonical "
                   "config")  # fmt: skip
    h.add_argument("--out", required=True, help="directory for the healed model and heal.json")
    h.add_argument("--pick", help="best (default) or an index into pareto.json")
    h.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps ({d.steps})")
    h.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"windows per step ({d.batch_size})")  # fmt: skip
    h.add_argument("--seq-len", type=int, default=d.seq_len,
                   help=f"tokens per window ({d.seq_len})")  # fmt: skip
    h.add_argument("--lr", type=float, help="peak learning rate (1e-4; 1e-3 with --lora)")
    h.add_argument("--warmup", type=float, default=d.warmup,
                   help=f"share of the steps warming up ({d.warmup})")  # fmt: skip
    h.add_argument("--weight-decay", type=float, default=d.weight_decay)
    h.add_argument("--clip", type=float, default=d.clip, help=f"gradient-norm clip ({d.clip})")
    h.add_argument("--seed", type=int, default=d.seed)
    h.add_argument("--lora", type=int, metavar="R",
                   help="train rank-R LoRA adapters (peft), merged at the end, instead of all "
                   "weights")  # fmt: skip
    h.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="K",
                   help=f"write a checkpoint every K steps ({d.checkpoint_every})")  # fmt: skip
    h.add_argument("--eval-every", type=int, metavar="K",
                   help="held-out KL every K steps, for the curve (default: at "
                   "checkpoints)")  # fmt: skip
    h.add_argument("--validation-windows", type=int, default=d.validation_windows,
                   help=f"last windows of the text held out ({d.validation_windows})")  # fmt: skip
    h.add_argument("--data", help=".txt or .jsonl to heal on (default: the run's text)")
    h.add_argument("--device", default=d.device, help="cpu (float32) or cuda (bfloat16)")
    h.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass instead of "
                   "keeping them: less memory, one more forward pass per step")  # fmt: skip
    h.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    h.add_argument("--model", help="the dense model directory, if it moved since the run")
    h.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out")  # fmt: skip
    h.add_argument("--trust-remote-code", action="store_true")
    h.add_argument("--json", action="store_true", help="print heal.json's figures as JSON")


def _heal(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from searcher.heal import heal
    from searcher.heal_settings import HealSettings

    if args.threads is not None:
        if args.threads < 1:
            raise SearcherError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    settings = HealSettings(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, seed=args.seed,
        lora=args.lora, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
        validation_windows=args.validation_windows, data=args.data, device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    settings.check()
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} steps"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("held-out KL {task.fields[kl]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("loading", total=settings.steps, loss="-", kl="-")

        def on_step(state) -> None:
            kl = state.curve[-1]["kl"] if state.curve else None
            bar.update(task, completed=state.step, loss=f"{state.losses[-1]:.4f}",
                       kl="-" if kl is None else f"{kl:.4f}")  # fmt: skip

        res = heal(
            args.source, args.out, settings, args.pick, args.model, args.resume,
            args.trust_remote_code, on_phase=lambda text: bar.update(task, description=text),
            on_step=on_step,
        )  # fmt: skip
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}, indent=2))
        return
    b, a = res["before"], res["after"]
    print(f"healed {args.source} into {res['out']} ({res['mode']}, {res['steps']} steps, "
          f"{res['tokens']:,} tokens, {res['train_seconds']:.0f} s training)")  # fmt: skip
    ratio = "" if res["kl_ratio"] is None else f" ({res['kl_ratio']:.2f}x)"
    print(f"  held-out KL to dense {b['kl']:.4f} -> {a['kl']:.4f}{ratio}; "
          f"ppl {b['ppl']:.2f} -> {a['ppl']:.2f} (dense {res['dense_ppl']:.2f})")  # fmt: skip
    mem = res["memory"]
    cuda = f", CUDA peak {mem['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in mem else ""
    print(f"  peak RSS {mem['peak_rss_mib']:.0f} MiB{cuda}; figures in {res['out']}/heal.json")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )  # fmt: skip
    from rich.table import Table

    from searcher.run import resume, run
    from searcher.sweep import is_sweep, is_sweep_dir, resume_sweep, sweep

    given = {
        k: v for k, v in vars(args).items() if k not in ("command", "verbose", "config", "resume")
    }
    if "resume" in args and (set(given) - set(PLACEMENT) or "config" in args):
        flags = [f"--{name.replace('_', '-')}" for name in PLACEMENT]
        raise SearcherError(
            "--resume takes the run's own settings: drop all flags but "
            f"{', '.join(flags[:-1])} and {flags[-1]}"
        )
    base = RunSpec.from_file(args.config).to_dict() if "config" in args else {}
    if "space_options" in given:  # flags add to (and win over) the file's space options
        given["space_options"] = {**base.get("space_options", {}), **dict(given["space_options"])}
    spec = RunSpec.from_dict({**base, **given}).resolved()
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed:.1f}/{task.total:.0f} evals"),
        TextColumn("{task.fields[trials]} trials"), TextColumn("best KL {task.fields[best]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("loading", total=spec.evals, trials=0, best="-")

        def on_phase(text: str) -> None:
            bar.update(task, description=text)

        def on_progress(p) -> None:
            best = "-" if p.best_kl is None else f"{p.best_kl:.4f}"
            bar.update(task, description=p.status, completed=min(p.spent, p.budget),
                       total=p.budget, trials=p.trials, best=best)  # fmt: skip

        if "resume" in args and is_sweep_dir(args.resume):
            result = resume_sweep(args.resume, on_progress, on_phase, **given)
        elif "resume" in args:
            result = resume(args.resume, on_progress, on_phase, **given)
        elif is_sweep(spec.budget):
            result = sweep(spec, on_progress=on_progress, on_phase=on_phase)
        else:
            result = run(spec, on_progress=on_progress, on_phase=on_phase)
    if hasattr(result, "runs"):
        _print_sweep(result)
        return
    b = result.best
    table = Table(title="searcher run", show_header=False)
    table.add_row("budget", b["budget"])
    for metric, frac in b["fractions"].items():
        table.add_row(metric, f"{frac:.4f} of dense ({b['costs'][metric]:.4g})")
    table.add_row(
        "calibration KL", f"{b['calibration']['kl']:.4f} ({b['calibration']['windows']} windows)"
    )
    if "trained" in b["calibration"]:
        t = b["calibration"]["trained"]
        table.add_row(
            "selected by", f"calibration KL after {t['steps']} distillation steps: {t['kl']:.4f}"
        )
    v = b["validation"]
    table.add_row("validation KL", f"{v['kl']:.4f} ({v['windows']} windows)")
    table.add_row("validation ppl", f"{v['ppl']:.2f} (dense {v['dense_ppl']:.2f})")
    for kind, lat in b.get("latency", {}).items():
        if isinstance(lat, dict):
            table.add_row(
                f"{kind} latency ({b['latency']['device']})",
                f"measured {lat['measured_ms']:.2f} ms (predicted {lat['predicted_ms']:.2f}); "
                f"dense {lat['dense_measured_ms']:.2f} ms: {lat['speedup']:.2f}x faster",
            )
    table.add_row("trials / evals", f"{result.trials} / {result.evals:.1f}")
    table.add_row("wall time", f"{result.seconds:.0f} s")
    table.add_row("results", str(result.out))
    Console().print(table)


def _print_sweep(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"searcher run: {len(result.runs)} budgets")
    for col in ("budget", "costs (fraction of dense)", "calibration KL", "validation KL",
                "validation ppl", "evals", "results"):  # fmt: skip
        table.add_column(col)
    for r in result.runs:
        b = r.best
        fractions = ", ".join(f"{m} {f:.3f}" for m, f in b["fractions"].items())
        table.add_row(
            b["budget"], fractions, f"{b['calibration']['kl']:.4f}",
            f"{b['validation']['kl']:.4f}", f"{b['validation']['ppl']:.2f}", f"{r.evals:.1f}",
            str(r.out),
        )  # fmt: skip
    Console().print(table)
    Console().print(f"front: {result.out / 'front.png'}; all budgets: {result.out / 'sweep.json'}"
                    f" ({result.seconds:.0f} s)")  # fmt: skip


def _eval(args: argparse.Namespace) -> None:
    from searcher.evaluate import evaluate

    if args.windows < 1 or (args.threads is not None and args.threads < 1):
        raise SearcherError("--windows and --threads must be at least 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = evaluate(
        args.config, data_source=args.data, pick=args.pick, windows=args.windows,
        model=args.model, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    if args.json:
        print(json.dumps(res, indent=2))
        return
    fr = ", ".join(f"{k} {v:.4f}" for k, v in res["fractions"].items())
    print(f"{res['config']} on {res['data']} ({res['windows']}x{res['seq_len']} tokens)")
    print(f"  KL to dense {res['kl']:.4f}   ppl {res['ppl']:.2f} (dense {res['dense_ppl']:.2f})")
    print(f"  cost: {fr} of dense")


def _submit(args: argparse.Namespace) -> int:
    from searcher.submit import submit

    command = args.args[1:] if args.args[:1] == ["--"] else args.args
    result = submit(
        args.address, command, args.working_dir, not args.no_requirements, args.wait,
        on_log=lambda text: print(text, end="", flush=True),
    )  # fmt: skip
    if result.status is None:
        print(f"submitted job {result.job_id} to {result.address}")
        print(f"  follow it:  ray job logs --address {result.address} --follow {result.job_id}")
        print(f"  its status: ray job status --address {result.address} {result.job_id}")
        return 0
    print(f"job {result.job_id}: {result.status}", file=sys.stderr)
    return 0 if result.status == "SUCCEEDED" else 1


def _export(args: argparse.Namespace) -> None:
    from searcher.export import apply_config, export_run

    if args.command == "export":
        res = export_run(
            args.run_dir, args.format, args.out, args.pick, args.under, args.model,
            args.trust_remote_code,
        )  # fmt: skip
    else:
        res = apply_config(
            args.config, args.out, args.format, args.model, args.pick, args.trust_remote_code
        )
    print(f"wrote {res['format']} to {res['out']}")
    if "validation_kl" in res:
        hf = "; also a Hugging Face checkpoint" if "remote_code" in res else ""
        if res.get("remote_code"):
            hf += " (per-layer shapes in its own modeling file: trust_remote_code=True)"
        print(f"  {res['parameters']:,} parameters, validation KL {res['validation_kl']:.6f} "
              f"(the search's: {res['search_validation_kl']:.6f}){hf}")  # fmt: skip
    if "decode_steps" in res:
        print(f"  {' + '.join(res['files'])}: {res['bytes'] / 2**20:.1f} MiB "
              f"({res['bytes'] / res['weight_bytes']:.3f}x the float32 weights)")  # fmt: skip
        print(f"  prefill of {res['prefill_tokens']} tokens: max |logit - torch| = "
              f"{res['prefill_max_abs_logit_diff']:.2e}; {res['decode_steps']} cached decode "
              f"steps: max |logit - torch| = {res['decode_max_abs_logit_diff']:.2e}")  # fmt: skip


def _settings(args: argparse.Namespace):
    from searcher.latency import LatencySettings

    return LatencySettings(args.device, args.batch, args.seq, args.threads)


def _profile(args: argparse.Namespace) -> None:
    from rich.console import Console

    from searcher.latency_jobs import profile_model

    console = Console(stderr=True)
    with console.status("profiling") as status:
        res = profile_model(
            _settings(args), args.model, args.space, dict(args.space_options), args.out,
            args.corrections, args.seed, args.data, args.trust_remote_code,
            on_step=lambda text: status.update(f"profiling: {text}"), method=args.method,
        )  # fmt: skip
    t = res.table
    print(f"latency table for {t.device['backend']} ({t.device['cpu']}, {t.device['threads']} "
          f"threads) in {res.seconds:.0f} s: {res.path}")  # fmt: skip
    for wt in t.workloads.values():
        sizes = ", ".join(f"{k} {min(d.values()):.3f}-{max(d.values()):.3f} ms"
                          for k, d in wt.blocks.items())  # fmt: skip
        print(f"  {wt.workload.describe()}: fixed {wt.fixed_ms:.2f} ms; per block {sizes}; "
              f"correction x{wt.scale:.3f} {wt.offset_ms:+.2f} ms "
              f"({len(wt.fit)} whole models)")  # fmt: skip


def _latency(args: argparse.Namespace) -> None:
    from rich.console import Console

    from searcher.latency_jobs import dumps, measure_config, validate_table

    if args.latency_command == "measure":
        res = measure_config(
            args.config, _settings(args), args.pick, args.table, args.model,
            args.allow_table_mismatch, args.trust_remote_code,
        )  # fmt: skip
        if args.json:
            print(dumps(res))
            return
        print(f"{args.config} on {res['device']['backend']} ({res['device']['threads']} threads)")
        if "note" in res:
            print(f"  {res['note']}")
        for w in res["workloads"].values():
            pred = f", predicted {w['predicted_ms']:.2f} ms" if "predicted_ms" in w else ""
            print(f"  {w['workload']}: {w['measured_ms']:.2f} ms{pred}; dense "
                  f"{w['dense_measured_ms']:.2f} ms: {w['speedup']:.2f}x faster")  # fmt: skip
        return
    console = Console(stderr=True)
    with console.status("validating") as status:
        res = validate_table(
            _settings(args), args.n, args.table, args.model, args.space,
            dict(args.space_options), args.workload, args.out, args.seed,
            args.allow_table_mismatch, args.data, args.trust_remote_code,
            on_step=lambda done, total: status.update(f"measured {done}/{total} candidates"),
        )  # fmt: skip
    if args.json:
        print(dumps(res))
        return
    for note in res["notes"]:
        print(f"warning: table from another device: {note}", file=sys.stderr)
    print(f"{res['table']}: predictions against measurements ({res['out']})")
    for sm in res["summary"].values():
        print(f"  {sm['workload']}: {sm['within_5pct']:.0%} within ±5%, "
              f"{sm['within_10pct']:.0%} within ±10%, RMSE {sm['rmse_pct']:.1f}%, mean error "
              f"{sm['mean_error_pct']:+.1f}% (n={sm['n']}, measured "
              f"{sm['measured_range_ms'][0]:.1f}-{sm['measured_range_ms'][1]:.1f} ms)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        _quiet_libraries()
        if args.command == "run":
            _run(args)
        elif args.command == "submit":
            return _submit(args)
        elif args.command in ("export", "apply"):
            _export(args)
        elif args.command == "profile":
            _profile(args)
        elif args.command == "latency":
            _latency(args)
        elif args.command == "heal":
            _heal(args)
        else:
            _eval(args)
    except SearcherError as exc:
        print(f"searcher: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "heal":
            print("searcher: interrupted; healing continues from its last checkpoint with the "
                  "same command and --resume", file=sys.stderr)  # fmt: skip
        else:
            print("searcher: interrupted; every completed evaluation is stored: continue with "
                  "`searcher run --resume RUN_DIR`", file=sys.stderr)  # fmt: skip
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
