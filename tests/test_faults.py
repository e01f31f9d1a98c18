"""The catalog of bad input and faults: each bad input ends with one line and exit status 2,
before anything is written, and no fault loses completed work."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from searcher.cli import main
from searcher.rundir import claimed
from searcher.store import open_storage, set_aside_torn_record

ARGS = [
    "--seq-len",
    "32",
    "--importance-windows",
    "2",
    "--validation-windows",
    "2",
    "--offspring",
    "4",
    "--stages",
    "1:2,2:1",
    "--threads",
    "1",
    "--seed",
    "5",
]


@pytest.fixture(scope="module")
def model_dir(tiny_dir: Path, tmp_path_factory) -> Path:
    """A copy of the tiny model that only this module's runs use (cases aim exports at it)."""
    return Path(shutil.copytree(tiny_dir, tmp_path_factory.mktemp("faults") / "model"))


@pytest.fixture(scope="module")
def done_run(model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-run") / "run"
    assert main(["run", "--model", str(model_dir), "--evals", "8", "--out", str(out), *ARGS]) == 0
    return out


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every file under ``dirs`` with the hash of its bytes."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@dataclass
class Where:
    """What a case works on: the tiny model, a finished run (a copy), and a scratch dir."""

    model: Path
    run: Path
    tmp: Path

    def edit_best(self, **fields) -> Path:
        path = self.run / "best.json"
        config = json.loads(path.read_text())
        for key, value in fields.items():
            if key == "gene0":
                config["genes"][0] = value
            else:
                config[key] = value
        path.write_text(json.dumps(config))
        return path

    def model_copy(self, name: str, edit: Callable[[Path], None]) -> Path:
        path = Path(shutil.copytree(self.model, self.tmp / name))
        edit(path)
        return path

    def text(self, name: str, content: str) -> Path:
        path = self.tmp / name
        path.write_text(content)
        return path


def truncated_safetensors(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])


def garbled_safetensors(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:60] = b"x" * 52  # inside the JSON header
    f.write_bytes(bytes(data))


class Evil:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def pickled_bin(d: Path, evil: bool) -> None:
    import torch
    from safetensors.torch import load_file

    weights = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    if evil:
        torch.save({**weights, "x": Evil()}, d / "pytorch_model.bin")
    else:  # cut short: not a readable zip archive
        torch.save(weights, d / "pytorch_model.bin")
        data = (d / "pytorch_model.bin").read_bytes()
        (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])


def _export(w: Where, fmt: str, out: Path) -> list[str]:
    return ["export", str(w.run), "--format", fmt, "--out", str(out)]


def _run(w: Where, *args: str, model: Path | None = None) -> list[str]:
    return ["run", "--model", str(model or w.model), "--out", str(w.tmp / "new"), *ARGS, *args]


# (id, argv from the case's Where, what the one line says)
CASES: list[tuple[str, Callable[[Where], list[str]], str]] = [
    # hand-edited genes, wherever a config is read
    *[
        (f"genes-{label}-{cmd}", make, "'genes' should be a list of whole-number")
        for label, value in (("float", 1.5), ("string", "2"), ("null", None), ("bool", True))
        for cmd, make in (
            ("eval", lambda w, v=value: ["eval", str(w.edit_best(gene0=v))]),
            (
                "export",
                lambda w, v=value: (
                    w.edit_best(gene0=v),
                    ["export", str(w.run), "--format", "pruned", "--out", str(w.tmp / "x")],
                )[1],
            ),
            (
                "apply",
                lambda w, v=value: ["apply", str(w.edit_best(gene0=v)), "--out", str(w.tmp / "x")],
            ),
        )
    ],
    ("genes-not-a-list", lambda w: ["eval", str(w.edit_best(genes="0,1"))], "'genes' should be"),
    # numbers that are not finite
    ("evals-inf", lambda w: _run(w, "--evals", "inf"), "--evals must be a finite number"),
    ("evals-nan", lambda w: _run(w, "--evals", "nan"), "--evals must be a finite number"),
    (
        "evals-nan-yaml",
        lambda w: ["run", "--config", str(w.text("c.yaml", "evals: .nan\n"))],
        "--evals must be a finite number",
    ),
    (
        "evals-inf-yaml",
        lambda w: ["run", "--config", str(w.text("c.yaml", "evals: .inf\n"))],
        "--evals must be a finite number",
    ),
    # evaluations too few for evo's first generation from the uniform allocation: refused
    # before the model loads (the model here would not load); the default start (a profile
    # sized to --evals, or the uniform allocation scored first) never is
    (
        "evals-too-few",
        lambda w: [
            "run",
            "--model",
            str(w.model_copy("m", truncated_safetensors)),
            "--init",
            "uniform",
            "--evals",
            "2",
            "--out",
            str(w.tmp / "new"),
        ],
        "too few for evo",
    ),
    # space options: names and types are checked before the model loads
    (
        "space-option-nan",
        lambda w: _run(
            w,
            "--space",
            "sparsity",
            "--budget",
            "sparsity=0.5",
            "--space-option",
            "step=nan",
            model=w.model_copy("m", truncated_safetensors),
        ),
        "step = 'nan' should be a finite number",
    ),
    (
        "space-option-nan-yaml",
        lambda w: [
            "run",
            "--config",
            str(
                w.text(
                    "c.yaml", "space: sparsity\nbudget: sparsity=0.5\nspace_options: {step: .nan}\n"
                )
            ),
        ],
        "step = nan should be a finite number",
    ),
    (
        "space-option-float-for-int",
        lambda w: _run(w, "--space-option", "mlp_steps=2.5"),
        "mlp_steps = 2.5 should be a whole number",
    ),
    (
        "space-option-unknown",
        lambda w: _run(w, "--space-option", "mlp_stepz=4"),
        "unknown option 'mlp_stepz' for the width space",
    ),
    # run configs
    (
        "yaml-syntax",
        lambda w: ["run", "--config", str(w.text("c.yaml", "budget: [flops\n"))],
        "cannot read run config",
    ),
    (
        "yaml-python-tag",
        lambda w: [
            "run",
            "--config",
            str(w.text("c.yaml", "budget: !!python/object/apply:os.system ['touch PWNED']\n")),
        ],
        "tags that build Python objects are not allowed",
    ),
    # trial storage that is not a file
    ("storage-device", lambda w: _run(w, "--storage", "/dev/full"), "not a regular file"),
    ("storage-directory", lambda w: _run(w, "--storage", str(w.tmp)), "not a regular file"),
    # model weights that do not load
    (
        "safetensors-truncated",
        lambda w: _run(w, model=w.model_copy("m", truncated_safetensors)),
        "SafetensorError",
    ),
    (
        "safetensors-garbled",
        lambda w: _run(w, model=w.model_copy("m", garbled_safetensors)),
        "SafetensorError",
    ),
    (
        "bin-runs-code",
        lambda w: _run(w, model=w.model_copy("m", lambda d: pickled_bin(d, evil=True))),
        "never runs their code",
    ),
    (
        "bin-truncated",
        lambda w: _run(w, model=w.model_copy("m", lambda d: pickled_bin(d, evil=False))),
        "cannot load the model",
    ),
    # one run, one directory
    (
        "second-run-other-settings",
        lambda w: [
            "run",
            "--model",
            str(w.model),
            "--space",
            "depth",
            "--budget",
            "blocks=0.75",
            "--out",
            str(w.run),
            *ARGS,
        ],
        "not an empty directory",
    ),
    (
        "second-run-same-settings",
        lambda w: ["run", "--model", str(w.model), "--out", str(w.run), *ARGS],
        "not an empty directory",
    ),
    # exports never write over what a run or config depends on
    (
        "export-into-model",
        lambda w: _export(w, "pruned", w.model),
        "which this config depends on",
    ),
    (
        "export-inside-model",
        lambda w: _export(w, "json", w.model / "config.json"),
        "which this config depends on",
    ),
    (
        "export-into-run",
        lambda w: _export(w, "pruned", w.run),
        "would overwrite the run",
    ),
    (
        "export-over-best",
        lambda w: _export(w, "json", w.run / "best.json"),
        "would overwrite the run",
    ),
    (
        "apply-over-itself",
        lambda w: [
            "apply",
            str(w.run / "best.json"),
            "--format",
            "json",
            "--out",
            str(w.run / "best.json"),
        ],
        "depends on",
    ),
]


@pytest.mark.parametrize(("make", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(
    make, needle: str, model_dir: Path, done_run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a pickle or tag that ran code would leave PWNED here
    run = Path(shutil.copytree(done_run, tmp_path / "run"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = make(Where(model_dir, run, scratch))
    before = snapshot(model_dir, run)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("searcher: error:"), err
    assert needle in lines[0], lines[0]
    assert snapshot(model_dir, run) == before  # nothing of the run or the model changed
    assert not (tmp_path / "new").exists() and not (scratch / "new").exists()
    assert not (tmp_path / "PWNED").exists()


def test_a_run_in_progress_keeps_its_directory(
    model_dir: Path, done_run: Path, tmp_path: Path, capsys
) -> None:
    """A second run, or a second resume, on a directory that a running run holds is refused
    before it writes anything (the holder here stands for a run in another process)."""
    fresh, started = tmp_path / "fresh", Path(shutil.copytree(done_run, tmp_path / "run"))
    for out, argv in (
        (fresh, ["run", "--model", str(model_dir), "--out", str(fresh), *ARGS]),
        (started, ["run", "--resume", str(started)]),
    ):
        with claimed(out, resume=out == started):
            before = snapshot(out)
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 2 and "in use by searcher process" in err, err
            assert len(err.strip().splitlines()) == 1
            assert snapshot(out) == before


def torn_copies(journal: Path, tmp_path: Path):
    """The journal cut at every byte offset of its last record."""
    data = journal.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    for offset in range(start, len(data)):
        cut = tmp_path / f"cut-{offset}" / "trials.journal"
        cut.parent.mkdir()
        cut.write_bytes(data[:offset])
        yield offset, data, cut


def test_a_torn_last_record_is_set_aside_at_every_offset(done_run: Path, tmp_path: Path) -> None:
    journal = done_run / "trials.journal"
    whole = open_storage(str(journal))
    study = whole.get_all_studies()[0]._study_id
    trials = whole.get_all_trials(study, deepcopy=False)
    start = None
    for offset, data, cut in torn_copies(journal, tmp_path):
        start = start if start is not None else offset
        side = set_aside_torn_record(cut)
        if offset == start:  # nothing of the last record was written: nothing torn
            assert side is None and cut.read_bytes() == data[:offset]
            continue
        assert side is not None and side.read_bytes() == data[start:offset]  # every byte kept
        assert cut.read_bytes() == data[:start]
        storage = open_storage(str(cut))
        got = storage.get_all_trials(storage.get_all_studies()[0]._study_id, deepcopy=False)
        assert len(got) == len(trials)  # every trial; the last record only changed a state
        assert [t.params for t in got] == [t.params for t in trials]
        assert [t.user_attrs["scores"] for t in got] == [t.user_attrs["scores"] for t in trials]
    assert start is not None and len(data) - start > 50


def test_resume_after_a_torn_record_goes_on_every_time(
    done_run: Path, tmp_path: Path, capsys, caplog
) -> None:
    """The crash the store must survive: killed in the middle of writing a record, then
    resumed again and again."""
    run = Path(shutil.copytree(done_run, tmp_path / "run"))
    journal = run / "trials.journal"
    journal.write_bytes(journal.read_bytes()[:-20])
    trials = pd.read_parquet(done_run / "trials.parquet")
    best = json.loads((done_run / "best.json").read_text())
    for attempt in range(3):
        caplog.clear()
        code = main(["run", "--resume", str(run)])
        err = capsys.readouterr().err
        assert code == 0, err
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(said) == (attempt == 0) and all("cut short" in m for m in said), said
        again = pd.read_parquet(run / "trials.parquet")
        assert again["genes"].map(tuple).tolist() == trials["genes"].map(tuple).tolist()
        assert json.loads((run / "best.json").read_text())["genes"] == best["genes"]
        info = json.loads((run / "run.json").read_text())
        assert info["replayed_evals"] == info["evals"]  # nothing scored twice
    assert len(list(run.glob("trials.journal.torn-*"))) == 1
