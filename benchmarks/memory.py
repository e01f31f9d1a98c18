"""Peak memory of a search, per space, against the bytes of the dense weights.

Builds a randomly initialised Llama of about 420 M parameters (hidden 1024, 24 layers,
16 heads, 8 KV heads, MLP 4096, the embedded SmolLM2 tokenizer's 49152-token vocabulary;
about 1.7 GB of float32 weights), then runs, each in a fresh process under
``/usr/bin/time -v``:

- ``runtime``: Python with searcher, torch and transformers imported and the tokenizer
  loaded, no weights (the fixed part of every run);
- ``load``: the model loaded by searcher and nothing else (what any tool pays);
- ``searcher run --model DIR --space S --evals 2 --seq-len 128 --threads 1`` for ``width``,
  ``depth``, ``sparsity`` and ``joint``;

and reports each peak resident set size, its ratio to the weight bytes, and what it holds
above the runtime, in weights (the target: at most 1.5). ``--dtype bfloat16`` builds,
loads and searches the model in bfloat16. Writes ``--out``/memory-<dtype>.json, with the
command, the machine's CPU and the date.

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from latency_models.backends import cpu_name

BUDGETS = {
    "width": "flops=0.5", "depth": "blocks=0.75", "sparsity": "sparsity=0.5", "joint": "flops=0.5"
}  # fmt: skip


def build(where: Path, dtype: str = "float32") -> int:
    """The random model and the embedded tokenizer saved in ``where``; its weight bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from searcher.models import load

    tokenizer = load(None, "cpu", "float32", False).tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
        max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_rss(command: list[str]) -> tuple[int, float]:
    """Peak RSS in bytes and wall seconds of ``command`` (GNU time's own figures)."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = (float(x) if x else 0.0 for x in wall.groups())
    return kb * 1024, hours * 3600 + minutes * 60 + seconds


def runtime_rss(tokenizer: Path) -> tuple[int, float]:
    """Peak RSS (bytes) and wall seconds of ``runtime``: Python with searcher, torch and
    transformers imported and the tokenizer in ``tokenizer`` loaded, no weights; what every
    peak is reported above."""
    code = (
        "import searcher.run, transformers; from searcher.models import load; "
        f"transformers.AutoTokenizer.from_pretrained({str(tokenizer)!r})"
    )
    return peak_rss([sys.executable, "-c", code])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", default="width,depth,sparsity,joint")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default="results/bench-memory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="searcher-memory-") as tmp:
        model = Path(tmp) / "model"
        weights = build(model, args.dtype)
        python = sys.executable
        rows = {}
        rows["runtime"] = runtime_rss(model)
        load = ["-c", "from searcher.models import load; import sys; "
                f"load({str(model)!r}, 'cpu', {args.dtype!r}, False)"]  # fmt: skip
        rows["load"] = peak_rss([python, *load])
        for space in args.spaces.split(","):
            command = [
                python, "-m", "searcher", "run", "--model", str(model), "--space", space,
                "--budget", BUDGETS[space], "--evals", "2", "--seq-len", "128", "--threads",
                "1", "--dtype", args.dtype, "--out", str(Path(tmp) / f"run-{space}"),
            ]  # fmt: skip
            rows[space] = peak_rss(command)
            print(space, rows[space], flush=True)
    base = rows["runtime"][0]
    table = {
        name: {"peak_gb": round(rss / 1e9, 3), "ratio_to_weights": round(rss / weights, 2),
               "above_runtime_gb": round((rss - base) / 1e9, 3),
               "above_runtime_in_weights": round((rss - base) / weights, 2),
               "wall_s": round(wall, 1)}
        for name, (rss, wall) in rows.items()
    }  # fmt: skip
    given = sys.argv[1:] if argv is None else argv
    result = {
        "weights_gb": round(weights / 1e9, 3), "dtype": args.dtype, "runs": table,
        "command": " ".join(["benchmarks/memory.py", *given]),
        "cpu": cpu_name(), "date": datetime.date.today().isoformat(),
    }  # fmt: skip
    (out / f"memory-{args.dtype}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"dense weights: {weights / 1e9:.2f} GB ({args.dtype})")
    print("| run | peak RSS GB | × weights | above runtime GB | above runtime × weights | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['peak_gb']:.2f} | {r['ratio_to_weights']:.2f} | "
              f"{r['above_runtime_gb']:.2f} | {r['above_runtime_in_weights']:.2f} | "
              f"{r['wall_s']:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
