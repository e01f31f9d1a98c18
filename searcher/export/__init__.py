"""Take a chosen config elsewhere: the canonical JSON, the physically pruned model, ONNX,
the channels Torch-Pruning removes, EvoPress's layer-drop files and LLM Compressor recipes
(``export.recipes``). ``searcher export`` and
``searcher apply`` call these."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from searcher.budget import Budget
from searcher.errors import SearcherError

CANONICAL = "searcher-config/1"
FORMATS = ("json", "pruned", "onnx", "torch-pruning", "evopress", "llmcompressor")

__all__ = ["FORMATS", "apply_config", "choose", "export_run", "load_pruned"]


def load_pruned(path: str | Path, dtype: Any = None) -> Any:
    """A pruned model written by ``searcher export --format pruned`` / ``searcher apply``:
    a transformers causal LM whose layers have their own shapes (see ``export.pruned``)."""
    import torch

    from searcher.export.pruned import load_pruned as _load

    return _load(path, dtype or torch.float32)


def choose(run_dir: str | Path, pick: str = "best", under: str | None = None) -> dict[str, Any]:
    """A config of a run: ``best``, entry INDEX of its Pareto front, or (``under``) the
    lowest-KL front entry whose costs meet a budget such as ``flops=0.5``."""
    from searcher.run import read_config

    run = Path(run_dir)
    if not (run / "best.json").is_file():
        raise SearcherError(f"{run_dir} is not a finished searcher run (no best.json there)")
    if under is not None:
        budget = Budget.parse(under)
        if budget.absolute:
            raise SearcherError("--under takes fractions of dense (flops=0.5), not latency_ms")
        front = read_config(str(run / "pareto.json"), 0)  # the checked header (and its front)
        fits = [e for e in front["front"] if _meets(budget, e)]
        if not fits:
            raise SearcherError(f"no config on the front of {run_dir} meets {under}")
        best = min(fits, key=lambda e: e["calibration"]["kl"])
        return {**front, **best}
    if pick == "best":
        return read_config(str(run / "best.json"), None)
    try:
        index = int(pick)
    except ValueError:
        raise SearcherError(f"--pick {pick!r}: give best or an index into pareto.json") from None
    return read_config(str(run / "pareto.json"), index)


def _meets(budget: Budget, entry: dict[str, Any]) -> bool:
    fractions = entry.get("fractions", {})
    return all(m in fractions for m in budget.limits) and budget.satisfied(fractions)


def canonical(config: dict[str, Any]) -> dict[str, Any]:
    """The config every other format is made from (and what eval and apply read)."""
    keep = ("searcher", "model", "dtype", "space", "data", "budget", "genes", "config",
            "costs", "fractions", "feasible", "calibration", "validation", "latency",
            "algorithm", "seed")  # fmt: skip
    return {"format": CANONICAL, **{k: config[k] for k in keep if k in config}}


def export_config(
    config: dict[str, Any],
    source: str,
    fmt: str,
    out: str | Path,
    model: str | None = None,
    trust_remote_code: bool = False,
    on_phase: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Write ``config`` (from ``source``) in format ``fmt`` to ``out``."""
    if fmt not in FORMATS:
        raise SearcherError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _refuse_overwrite(config, Path(source), out, model)
    start = time.time() - 1.0
    result = _write(canonical(config), config, source, fmt, out, model, trust_remote_code, on_phase)
    for path in [out] if out.is_file() else out.rglob("*"):
        if path.is_file() and path.stat().st_mtime >= start:  # what this export wrote
            path.chmod(0o644)  # whatever the umask: a model is for other users and services
    return result


def _write(
    cfg: dict[str, Any], config: dict[str, Any], source: str, fmt: str, out: Path,
    model: str | None, trust_remote_code: bool, on_phase: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    if fmt == "json":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return {"format": fmt, "out": str(out)}
    if fmt == "evopress":
        from searcher.export.recipes import evopress_text

        text = evopress_text(cfg)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        return {"format": fmt, "out": str(out)}
    from searcher.export import recipes
    from searcher.run import session_of_config

    if fmt == "torch-pruning":
        from searcher.export.torch_pruning_spec import refuse_unless_width

        refuse_unless_width(cfg)
    if fmt == "llmcompressor":
        recipes.refuse_unless_sparsity(cfg)

    on_phase("rebuilding the space the config was searched in")
    session, genes = session_of_config(source, config, model, "cpu", None, None, trust_remote_code)
    if fmt == "llmcompressor":
        on_phase("writing the recipe with the search's counts")
        info = recipes.export_llmcompressor(cfg, session, genes, out)
        return {"format": fmt, "out": str(out), **info}
    if fmt == "torch-pruning":
        on_phase("removing the channels with Torch-Pruning and checking the result")
        check = export_torch_pruning(cfg, session, genes, out, model, trust_remote_code)
        return {"format": fmt, "out": str(out), **check}
    pruned = session.space.materialize(genes)  # pruned and onnx
    if fmt == "pruned":
        from searcher.export.pruned import save_pruned

        on_phase("writing the pruned model")
        info = save_pruned(pruned, out, cfg)
        session.loaded.tokenizer.save_pretrained(out)
        on_phase("checking the saved model against the search")
        check = faithful(session, genes, load_pruned(out, session.loaded.model.dtype))
        return {"format": fmt, "out": str(out), **info, **check}
    from searcher.export.onnx import export_onnx

    on_phase("building and checking the ONNX model")
    return {"format": fmt, "out": str(out), **export_onnx(pruned, session, out)}


def _refuse_overwrite(config: dict[str, Any], source: Path, out: Path, model: str | None) -> None:
    """``out`` may not be the model the config needs, the config itself, or its run."""
    from searcher import models
    from searcher.run import model_source
    from searcher.rundir import refuse_overwrite

    try:
        model_dir = model_source(config, model)
    except (KeyError, TypeError, AttributeError):
        raise SearcherError(f"{source}: 'model' should name the model's source") from None
    protected = [models.cache_root() if model_dir is None else Path(model_dir)]
    if not source.is_dir():
        protected.append(source)  # the config file being applied
    run_dir = source if source.is_dir() else source.parent  # best.json's run, if it has one
    if not (run_dir / "run.json").is_file():
        run_dir = None
    refuse_overwrite(out, run_dir, protected)


def faithful(session: Any, genes: tuple[int, ...], model: Any) -> dict[str, Any]:
    """The saved model's KL to dense on the run's validation windows against the KL the search
    computes for the same genes: they must agree (1e-4 relative)."""
    from searcher.fitness import Evaluator

    space = session.space
    val = session.windows.validation
    dense = Evaluator(session.loaded.model, val, space.apply, space.dense(), 4)
    searched = float(dense.score(genes, 0, dense.n_windows).kl.mean())
    space.apply(space.dense())
    saved = Evaluator(model, val, lambda c: None, (), 4, reference=dense.reference())
    got = float(saved.score((), 0, saved.n_windows).kl.mean())
    if not math.isclose(got, searched, rel_tol=1e-4, abs_tol=1e-6):
        raise SearcherError(
            f"the exported model's validation KL {got:.6f} differs from the search's "
            f"{searched:.6f}: the export is not faithful (please report this)"
        )
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"validation_kl": got, "search_validation_kl": searched, "parameters": params}


def export_torch_pruning(
    config: dict[str, Any], session: Any, genes: tuple[int, ...], out: Path,
    model: str | None = None, trust_remote_code: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The Torch-Pruning spec (``export.torch_pruning_spec``), checked: its channels, removed
    from a fresh copy of the model by Torch-Pruning (and its attributes set), give the search's
    parameter count and validation KL."""
    from searcher import models
    from searcher.export.torch_pruning_spec import apply, spec
    from searcher.run import model_source

    dtype = config.get("dtype", "float32")
    dense = models.load(model_source(config, model), "cpu", dtype, trust_remote_code).model
    doc = spec(config, session.space.structure, str(dense.name_or_path), dtype)
    check = faithful(session, genes, apply(dense, doc))
    searched = config.get("costs", {}).get("params")
    if searched is not None and check["parameters"] != int(searched):
        raise SearcherError(
            f"Torch-Pruning's model has {check['parameters']:,} parameters, the search counted "
            f"{int(searched):,}: the export is not faithful (please report this)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1)
    # channel lists on one line each
    text = re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: f"[{' '.join(m[1].split())}]", text)
    out.write_text(text + "\n", encoding="utf-8")
    return check


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path, pick: str = "best", under: str | None = None,
    model: str | None = None, trust_remote_code: bool = False,
    on_phase: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:  # fmt: skip
    """``searcher export RUN_DIR --format F``."""
    config = choose(run_dir, pick, under)
    return export_config(config, str(run_dir), fmt, out, model, trust_remote_code, on_phase)


def apply_config(
    path: str, out: str | Path, fmt: str = "pruned", model: str | None = None,
    pick: int | None = None, trust_remote_code: bool = False,
    on_phase: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:  # fmt: skip
    """``searcher apply CONFIG.json``: prune straight from a config file (canonical JSON,
    best.json, or pareto.json with ``pick``)."""
    from searcher.run import read_config

    config = read_config(path, pick)
    return export_config(config, path, fmt, out, model, trust_remote_code, on_phase)
