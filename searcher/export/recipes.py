"""Configs as other tools' own inputs: EvoPress's layer-drop file and LLM Compressor recipes.

**EvoPress** (github.com/IST-DASLab/EvoPress) reads two kinds of per-layer files:

- depth (``evo_drop_search.py`` writes it, ``eval_ppl.py`` / ``lmeval.py --drop_layer_config``
  read it with ``src/model_utils.py: drop_layers_from_config``): one line per decoder layer,
  in order, ``line.strip("\\n")`` of which must be ``none``, ``attn``, ``mlp`` or
  ``attn+mlp``, and as many lines as the model has layers (``drop_layers`` asserts it). Its
  ``get_attn_layer_name`` / ``get_mlp_layer_name`` know only ``llama`` and ``mistral``
  models (``self_attn`` and ``mlp``). A dropped block adds nothing to the residual stream
  there as here, so this is exactly a searched ``depth`` config.
- sparsity (``load_sparse_weights`` in ``src/model_utils.py``, ``load_compressed_weights`` in
  ``eval_ppl.py``): ``layer_name, level = line.split(":")`` and ``f"{int(level)}.pth"`` of a
  database ``prune.py`` built. Its levels are not sparsities: level l of a layer of N weights
  holds sparsity ``--sparsity + l * --weights_diff / N`` (``src/pruner.py: _prune_group``),
  one step of the same number of weights in every layer, for at most ``--num_levels`` steps
  each way. Layers of different sizes therefore step by different fractions, and a config of
  the 0.1-step grid is on the levels of no database worth building (for sizes without a
  factor of 5, none at all). Sparsity configs are refused, and so are width configs (EvoPress
  has no structured-width search): they go to LLM Compressor / Torch-Pruning / ``pruned``.

**LLM Compressor** (0.14): ``WandaPruningModifier`` zeroes ``int(in_features * sparsity)``
weights of every row (``wanda_sparsify.py: sparsify_weight``), where the search zeroed
``ceil(s * in_features)``. The recipe gives each layer the sparsity for which LLM Compressor's
count is the search's: k / in_features for k weights zeroed per row (nudged up where float
rounding would make ``int`` drop one), one modifier per distinct value.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from searcher.errors import SearcherError

EVOPRESS_DEPTH_TYPES = ("llama", "mistral")  # what EvoPress's drop_layers can name blocks of
_DROPS = {(True, True): "none", (False, True): "attn", (True, False): "mlp",
          (False, False): "attn+mlp"}  # fmt: skip


def evopress_text(config: dict[str, Any]) -> str:
    """The layer-drop file EvoPress's ``drop_layers_from_config`` reads, for a depth config:
    one line per decoder layer, ``none``/``attn``/``mlp``/``attn+mlp`` (the blocks dropped)."""
    space = config["space"]["name"]
    if space == "sparsity":
        raise SearcherError(
            "EvoPress's sparsity levels step every layer by one fixed number of weights "
            "(prune.py --weights_diff), so this config's per-layer sparsities are no levels of "
            "its databases: export sparsity configs with --format llmcompressor or pruned"
        )
    if space != "depth":
        raise SearcherError(
            f"EvoPress has no {space} search or database (it reads layer-drop files for depth "
            "configs): export width configs with --format torch-pruning or pruned"
        )
    model_type = (config["model"].get("config") or {}).get("model_type")
    if model_type not in EVOPRESS_DEPTH_TYPES:
        raise SearcherError(
            f"EvoPress's drop_layers_from_config knows llama and mistral models, not "
            f"{model_type}: export this depth config with --format pruned"
        )
    detail = config.get("config")
    if not isinstance(detail, dict) or len(detail) != len(config["genes"]):
        raise SearcherError(
            "the config's 'config' and 'genes' do not match: restore it from the run"
        )
    # the depth space's genes are its layers in order, each attention then MLP
    entries = list(detail.items())
    if len(entries) % 2:
        raise SearcherError("the depth config has an odd number of blocks: restore it from the run")
    lines = []
    for (attn, a), (mlp, m) in zip(entries[::2], entries[1::2]):
        kept = tuple((d or {}).get("kept") if isinstance(d, dict) else None for d in (a, m))
        if not all(isinstance(k, bool) for k in kept):
            raise SearcherError(
                f"the depth config's {attn} / {mlp} say nothing kept: restore it from the run"
            )
        lines.append(_DROPS[kept])
    return "\n".join(lines) + "\n"


def refuse_unless_sparsity(config: dict[str, Any]) -> None:
    if config["space"]["name"] != "sparsity":
        raise SearcherError(
            "llmcompressor recipes carry unstructured sparsity: export a config of the "
            f"sparsity space (this one is {config['space']['name']}; try --format pruned)"
        )


def llmcompressor_sparsity(in_features: int, zeroed: int) -> float:
    """The sparsity for which LLM Compressor's Wanda zeroes exactly ``zeroed`` weights of a
    row of ``in_features`` (it zeroes ``int(in_features * sparsity)``)."""
    s = zeroed / in_features
    while int(in_features * s) < zeroed:
        s = math.nextafter(s, math.inf)
    if int(in_features * s) != zeroed:
        raise SearcherError(f"no sparsity zeroes {zeroed} of {in_features} in LLM Compressor")
    return s


def llmcompressor_recipe(config: dict[str, Any], rows: dict[str, tuple[int, int]]) -> str:
    """An LLM Compressor recipe under which ``oneshot`` zeroes, in every row of each linear
    layer, as many weights as the search did: one ``WandaPruningModifier`` (the mask criterion
    the search scored) per distinct sparsity, targeting its layers by exact-name regex.
    ``rows`` maps each linear layer to (its input features, weights the search zeroed per
    row); layers kept dense get no modifier."""
    import yaml

    refuse_unless_sparsity(config)
    groups: dict[float, list[str]] = {}
    for name, (in_features, zeroed) in rows.items():
        if zeroed > 0:
            groups.setdefault(llmcompressor_sparsity(in_features, zeroed), []).append(name)
    stage = {
        f"sparsity_{repr(s).replace('.', '_')}_modifiers": {
            "WandaPruningModifier": {
                "sparsity": s,
                "mask_structure": "0:0",
                "targets": [f"re:^{re.escape(n)}$" for n in names],
            }
        }
        for s, names in sorted(groups.items())
    }
    head = (
        f"# searcher sparsity config for {config['model']['source']}: one Wanda modifier per\n"
        "# distinct sparsity; LLM Compressor zeroes int(in_features * sparsity) weights of a\n"
        "# row, and each value is k / in_features for the k weights the search zeroed per row\n"
        "# (searched sparsity s: k = ceil(s * in_features)).\n"
        "# Use: llmcompressor.oneshot(model=..., dataset=..., recipe='this file'); with the\n"
        "# run's importance windows and pipeline='basic' it picks the searched weights (README)\n"
    )
    return head + yaml.safe_dump({"sparsity_stage": stage}, sort_keys=False)


def export_llmcompressor(
    config: dict[str, Any], session: Any, genes: tuple[int, ...], out: Path
) -> dict[str, Any]:
    """Write the recipe of a sparsity config, with the counts of the space it was searched in
    (``session``): per linear layer, its input features and the weights its mask zeroes per
    row at the searched level."""
    space = session.space
    if space.structure.moe:
        raise SearcherError(
            "LLM Compressor's pruning modifiers target nn.Linear modules, and a mixture-of-"
            "experts model's experts are fused 3-D tensors: export with --format pruned"
        )
    rows = {
        gene.name: space.row_zeros(gi, level)  # the space's own count
        for gi, (gene, level) in enumerate(zip(space.genes, genes, strict=True))
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(llmcompressor_recipe(config, rows), encoding="utf-8")
    layers = sum(1 for _, zeroed in rows.values() if zeroed)
    return {"layers": len(rows), "sparse_layers": layers}
