"""Our OWL baseline against LLM Compressor's own OWL, on the embedded model.

OWL (Yin et al., 2024) sets each decoder layer's sparsity from its share of outlier weights
(Wanda score above M = 5 times the layer's mean), spread over [-lambda, +lambda] around the
target (lambda = 0.08). Both implementations are fed the same calibration windows; this
prints each layer's sparsity from each, the largest difference, and what our ``sparsity``
space's grid rounds them to (``--step``: 0.1 by default in searcher, 0.01 here so that the
published continuous ratios can be expressed). Then it prunes with each and scores both on
the held-out validation windows: ours (Wanda masks at OWL's ratios, through ``searcher
eval``'s code path) and LLM Compressor's ``oneshot`` with ``WandaPruningModifier(
sparsity_profile="owl")``.

    .venv/bin/python benchmarks/owl_check.py --sparsity 0.7
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from searcher.algorithms.allocations import OWL, OWL_LAMBDA
from searcher.budget import Budget
from searcher.run import SessionKey, open_session, problem_for
from searcher.spec import RunSpec
from spaces.sparsity import OWL_M


def oneshot_owl(
    model: torch.nn.Module, windows: torch.Tensor, sparsity: float, layers_path: str
) -> dict:
    """Prune ``model`` in place with LLM Compressor's ``oneshot``: Wanda with the OWL
    profile (M = 5, lambda = 0.08), the windows as calibration samples. Returns the layer
    sparsities its own ``_infer_owl_layer_sparsity`` chose (recorded as it returns)."""
    import llmcompressor.pipelines.basic.pipeline as basic
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    chosen: dict[str, float] = {}
    infer = WandaPruningModifier._infer_owl_layer_sparsity

    class Quiet:  # no lifecycle events while OWL's own calibration pass runs
        calibration_start = sequential_epoch_end = calibration_end = staticmethod(
            lambda *args, **kwargs: None
        )

    def recording(self, *args, **kwargs):
        # LLM Compressor 0.14 runs OWL's activation pass from the modifier's initialize,
        # before the session is initialized, and its calibration events then raise
        # "Cannot invoke event before initializing": OWL cannot run in oneshot as shipped.
        # With the events silenced here the pass, and every number after it, is its own.
        real, basic.LifecycleCallbacks = basic.LifecycleCallbacks, Quiet
        try:
            chosen.update(infer(self, *args, **kwargs))
        finally:
            basic.LifecycleCallbacks = real
        # and its hooks take a list (one value per target layer, in order), not the dict
        # the OWL pass returns
        return list(chosen.values())

    recipe = WandaPruningModifier(
        sparsity=sparsity, sparsity_profile="owl", owl_m=int(OWL_M), owl_lmbda=OWL_LAMBDA,
        mask_structure="0:0", targets=[f"re:{re.escape(layers_path)}\\.\\d+$"],
    )  # fmt: skip
    data = Dataset.from_dict({"input_ids": windows.tolist(),
                              "attention_mask": torch.ones_like(windows).tolist()})  # fmt: skip
    WandaPruningModifier._infer_owl_layer_sparsity = recording
    try:
        oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(windows),
                max_seq_length=windows.shape[1], pipeline="basic")  # fmt: skip
    finally:
        WandaPruningModifier._infer_owl_layer_sparsity = infer
    return chosen


@torch.no_grad()
def scores(model: torch.nn.Module, dense: torch.nn.Module, windows: torch.Tensor) -> dict:
    """Mean KL to the dense model and perplexity on ``windows`` (all positions)."""
    kls, nlls = [], []
    for ids in windows:
        ids = ids[None]
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        ref = torch.log_softmax(dense(ids).logits.float(), -1)[0]
        kls.append(float((ref.exp() * (ref - logp)).sum(-1).mean()))
        nlls.append(float(-logp[:-1].gather(1, ids[0, 1:, None]).mean()))
    return {"kl": float(np.mean(kls)), "ppl": math.exp(float(np.mean(nlls)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--step", type=float, default=0.01)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4, help="calibration windows")
    parser.add_argument("--validation-windows", type=int, default=8)
    parser.add_argument("--out", default="results/bench-owl")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    spec = RunSpec(
        space="sparsity",
        budget=f"sparsity={args.sparsity}",
        seq_len=args.seq_len,
        importance_windows=args.windows,
        validation_windows=args.validation_windows,
        space_options={"step": args.step},
    ).resolved()
    session = open_session(SessionKey.of(spec, args.windows))
    space, windows = session.space, session.windows
    problem = problem_for(space, Budget.parse(spec.budget))
    owl = OWL(problem, seed=0, full_windows=args.windows)
    ours = 1 - owl.densities()  # per gene; one value per decoder layer
    chosen = owl.allocate()
    layers = space.gene_layers()
    per_layer = {i: float(ours[layers.index(i)]) for i in sorted(set(layers))}
    rounded = {i: float(space.genes[layers.index(i)].values[chosen[layers.index(i)]])
               for i in per_layer}  # fmt: skip

    space.apply(space.dense())
    dense = copy.deepcopy(session.loaded.model).eval()
    calib = windows.calibration[: args.windows]
    t0 = time.perf_counter()
    theirs_model = copy.deepcopy(dense)
    llmc = oneshot_owl(theirs_model, calib, args.sparsity, space.structure.family.layers_path)
    llmc_layers = {int(k.rsplit(".", 1)[1]): float(v) for k, v in llmc.items()}
    diff = max(abs(per_layer[i] - llmc_layers[i]) for i in per_layer)
    print(f"layer  ours    llmcompressor  ours on the {args.step:g} grid")
    for i in per_layer:
        print(f"{i:5d}  {per_layer[i]:.4f}  {llmc_layers[i]:.4f}         {rounded[i]:.2f}")
    print(f"largest difference in layer sparsity: {diff:.2e} ({time.perf_counter() - t0:.0f} s)")

    # score each pruned model on the validation windows
    space.apply(problem.to_budget(chosen, np.random.default_rng(0)))
    ours_scores = scores(session.loaded.model, dense, windows.validation)
    theirs_scores = scores(theirs_model, dense, windows.validation)
    uniform = problem.uniform()
    space.apply(uniform)
    uniform_scores = scores(session.loaded.model, dense, windows.validation)
    result = {
        "sparsity": args.sparsity, "step": args.step, "largest_layer_difference": diff,
        "ours": per_layer, "llmcompressor": llmc_layers, "ours_rounded": rounded,
        "validation": {"ours_owl": ours_scores, "llmcompressor_owl": theirs_scores,
                       "uniform": uniform_scores},
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"owl-{args.sparsity:g}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["validation"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
