"""ponder's native kernels, built on first use and loaded by ctypes: batch-invariant attention (``attention.c``), the
4-bit GEMM of ``--dtype q4`` (``q4mm.c``, see ``q4.py``) and the decoder layers that call both (``decoder.c``, see
``native_layers.py``).

``llama.attend_queries`` gives every new token the attention a one-token decode step gives it, so that speculative
decoding with quantized weights stays lossless. With PyTorch's kernels that takes one attention call per token (the
CPU flash kernel's bits change with the rows in the call), ~30-40 us of mostly fixed cost each: a 4-token verify
forward makes 120 of them, a decode step of 8 rows 240. ``attention.c`` computes each (token, KV head) in an order
that depends only on its own query and keys, so one call serves every token and row of a forward with the same bits.

Each C file is compiled once per machine with the system's C compiler (``cc -O3 -march=native -fopenmp``; ``$CC``
if set; without ``-fopenmp`` where the compiler lacks it, then single-threaded) into ``$PONDER_CACHE/native/``, keyed
by the source, the compiler and the CPU (its model name and instruction-set flags); OpenMP threads come from the
runtime PyTorch already loaded, and a call uses ``torch.get_num_threads()`` of them. Where no compiler is found, the
build fails, or a shape is outside the kernel's range (attention: not float32, head dim not a multiple of 16),
ponder keeps PyTorch's kernels (``reason()`` / ``q4_reason()`` say why; ``ponder info`` prints which runs).
``PONDER_NATIVE=0`` turns both kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"]


class Kernel:
    """One C file of ``ponder/model``, built with ``flags`` at most once per process and loaded: ``library()``, or
    why there is none (``reason``)."""

    def __init__(self, name: str, signatures: dict[str, tuple[object, list[object]]], flags: list[str] | None = None,
                 also: tuple[str, ...] = ()):
        """``also``: other C files of ``ponder/model`` linked into the same library (whose functions it calls)."""
        self.name, self.signatures, self.flags = name, signatures, flags or FLAGS
        self.source = Path(__file__).with_name(f"{name}.c")
        self.sources = [self.source, *(Path(__file__).with_name(f"{other}.c") for other in also)]
        self.lib: ctypes.CDLL | None = None
        self.reason: str | None = None
        self.tried = False

    def library(self) -> ctypes.CDLL | None:
        """The kernel, built and loaded on first call; None where it cannot be (``reason`` says why)."""
        if not self.tried:
            self.tried = True
            if os.environ.get("PONDER_NATIVE", "1") == "0":
                self.reason = "PONDER_NATIVE=0"
            else:
                try:
                    self.lib = self._build()
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    self.reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return self.lib

    def _build(self) -> ctypes.CDLL:
        from ponder.model.kernels import cpu_name, cpuinfo

        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (cc) found")
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        # -march=native builds for the CPU's instruction-set flags: machines of one model name but other extensions
        # (VMs of one "AMD EPYC" name differ) sharing a cache must not share a build
        headers = sorted(Path(__file__).parent.glob("*.h"))  # what the C files include
        parts = [*(src.read_text() for src in [*self.sources, *headers]), version, cpu_name(),
                 cpuinfo("flags", "Features") or "", " ".join(self.flags)]
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        target = _cache_dir() / f"{self.name}-{key[:16]}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            errors = []
            for flags in (self.flags, [f for f in self.flags if f != "-fopenmp"]):  # no OpenMP: one thread
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    built = Path(tmp) / target.name
                    run = subprocess.run([cc, *flags, *map(str, self.sources), "-o", str(built), "-lm"],
                                         capture_output=True, text=True, timeout=300)
                    if run.returncode == 0:
                        os.replace(built, target)  # atomic: concurrent processes each build, one file wins
                        break
                    errors.append(run.stderr.strip()[-300:])
            else:
                raise RuntimeError(f"{cc} failed: {errors[0]}")
        lib = ctypes.CDLL(str(target))
        for fn, (restype, argtypes) in self.signatures.items():
            getattr(lib, fn).restype = restype
            getattr(lib, fn).argtypes = argtypes
        return lib


def _cache_dir() -> Path:
    from ponder.model.loader import cache_root

    return cache_root() / "native"


_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
ATTENTION = Kernel("attention", {"ponder_attend": (_int, [_p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _int])})
Q4 = Kernel("q4mm", {"ponder_q4_mm": (_int, [_p, _p, _p, _i64, _i64, _i64, _int]),
                     "ponder_q4_mm_bulk": (_int, [_p, _p, _p, _i64, _i64, _i64, _int]), "ponder_q4_fast": (_int, []),
                     "ponder_q4_amx": (_int, [])})
# the decoder layers (``native_layers.py``) call the GEMM and attention of the other two files, linked in
_DECODER_ARGS = [_p, _i64, _i64, _i64, _i64, _i64, _i64, ctypes.c_float, _i64, _p, _p, _i64, _i64, _i64, _p, _p, _p,
                 _p, _p, _int, _int]
DECODER = Kernel("decoder", {"ponder_decoder": (_int, _DECODER_ARGS), "ponder_q4_fast": (_int, [])},
                 also=("q4mm", "attention"))


def library() -> ctypes.CDLL | None:
    """The attention kernel, built and loaded on first call; None where it cannot be (``reason()`` says why)."""
    return ATTENTION.library()


def reason() -> str | None:
    """Why the attention kernel is not in use (None when it is)."""
    ATTENTION.library()
    return ATTENTION.reason


def q4_library() -> ctypes.CDLL | None:
    """The 4-bit GEMM (``q4mm.c``) where this CPU runs its vector path (AVX512-BF16), else None (``q4_reason()``)."""
    lib = Q4.library()
    return lib if lib is not None and lib.ponder_q4_fast() else None


def q4_reason() -> str | None:
    """Why ``--dtype q4`` does not multiply with ponder's kernel (None when it does)."""
    lib = Q4.library()
    if lib is None:
        return Q4.reason
    return None if lib.ponder_q4_fast() else "no AVX512-BF16 (this CPU or the compiler's -march=native lacks it)"


def q4_mm(x: torch.Tensor, packed: torch.Tensor, out_features: int, bulk: bool = False) -> torch.Tensor:
    """x # [M, K] float32 times the weight ``packed`` holds (``q4.pack_native``; out_features x K) -> # [M, N]
    float32. The shapes and dtypes are checked here: the C kernel trusts them. ``bulk``: on the kernel for a
    prefill's rows (AMX where the CPU has it: other last bits than the decode kernel's; ``q4mm.c``)."""
    from ponder.errors import PonderError

    lib = Q4.library()
    if lib is None:
        raise PonderError(f"ponder's 4-bit GEMM is not available: {Q4.reason}")
    K = x.shape[-1]
    if (x.dtype is not torch.float32 or x.dim() != 2 or not x.is_cpu or packed.dtype is not torch.uint8
            or not packed.is_cpu or out_features % 16 or K % 32 or packed.numel() != out_features * K * 10 // 16
            or packed.dim() != 3 or not packed.is_contiguous()):  # cheap checks: 121 calls a decode step
        raise PonderError(f"q4 kernel: needs float32 x # [M, K] and a packed uint8 weight # [N / 16, K / 32, 320] "
                          f"on the CPU, got x {x.dtype} {tuple(x.shape)} on {x.device}, weight {packed.dtype} "
                          f"{tuple(packed.shape)} for N = {out_features}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    rc = (lib.ponder_q4_mm_bulk if bulk else lib.ponder_q4_mm)(x.data_ptr(), packed.data_ptr(), out.data_ptr(),
                                                               x.shape[0], out_features, K, torch.get_num_threads())
    if rc == -2:
        raise MemoryError("q4 kernel: no memory for its scratch")
    if rc != 0:
        raise RuntimeError(f"q4 kernel refused a {out_features} x {K} weight")
    return out


def q4_mm_bulk(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``q4_mm`` on the bulk kernel (a prefill's rows)."""
    return q4_mm(x, packed, out_features, bulk=True)


def q4_amx() -> bool:
    """Whether the 4-bit GEMM's bulk products (prefills) run on AMX here (``q4mm.c``)."""
    lib = Q4.library()
    return lib is not None and bool(lib.ponder_q4_amx())


def fits(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether attention on these tensors can run natively: float32 on the CPU, D a multiple of 16."""
    return (q.dtype == keys.dtype == torch.float32 and q.device.type == "cpu" and q.shape[-1] % 16 == 0
            and keys.stride(-1) == 1 and library() is not None)


def is_chain(row: list[list[int]]) -> bool:
    """Whether a row of ``StepContext.queries`` (as lists) is a chain of new tokens, each the previous one's child,
    then padding."""
    return all(p == t - 1 or (t > 0 and p < 0) for t, (_, p, _) in enumerate(row))


def plan(queries: torch.Tensor) -> torch.Tensor:
    """What ``attend`` needs, from ``StepContext.queries`` # [B, T, 3] (prefix length, parent, first readable slot per
    new token), built once per forward: a 1-D int64 tensor of a header (tokens, groups, most tokens in a group,
    most keys of a token, extra slots), then ``tok`` # [B * T, 5], ``groups`` # [n, 2] and ``extra`` as
    ``attention.c`` reads them. A row whose new tokens form a chain is one group (split where the first readable
    slot changes); a tree row's tokens read the prefix and then their ancestors' slots, one group each."""
    info = queries.tolist()
    B, T = len(info), len(info[0]) if info else 0
    tok = [[0, 0, 0, 0, 0] for _ in range(B * T)]
    groups: list[list[int]] = []
    extra: list[int] = []
    most = 0
    for b, row in enumerate(info):
        L = row[0][0]
        if is_chain(row):
            for t, (_, p, lo) in enumerate(row):
                if t > 0 and p < 0:
                    break
                tok[b * T + t] = [b, lo, L + t + 1, 0, 0]
                most = max(most, L + t + 1 - lo)
                if t > 0 and groups[-1][0] + groups[-1][1] == b * T + t and tok[b * T + t - 1][1] == lo:
                    groups[-1][1] += 1
                else:
                    groups.append([b * T + t, 1])
            continue
        chain_of: dict[int, list[int]] = {}  # token -> the slots of its ancestors and itself, root first
        for t, (_, p, lo) in enumerate(row):
            if t > 0 and p < 0:
                continue  # padding
            chain_of[t] = chain_of[p] + [L + t] if p >= 0 else [L + t]
            cut = max(0, lo - L)  # a window starting past the prefix: plain decoding no longer sees the first ones
            tok[b * T + t] = [b, min(lo, L), L, len(extra), len(chain_of[t]) - cut]
            extra += chain_of[t][cut:]
            most = max(most, L - min(lo, L) + len(chain_of[t]) - cut)
            groups.append([b * T + t, 1])
    most_group = max((n for _, n in groups), default=1)
    head = [B * T, len(groups), most_group, most, max(1, len(extra))]
    flat = head + [x for r in tok for x in r] + [x for g in groups for x in g] + (extra or [0])
    return torch.tensor(flat, dtype=torch.long)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """q # [B, T, H, D] float32 over keys/values # [B, Hkv, S, D] (the same strides, D contiguous) as ``plan`` (from
    ``plan()``) says -> # [B, T, H, D]; padding tokens (not in the plan) get zeros."""
    lib = library()
    assert lib is not None
    q = q.contiguous()
    out = torch.empty_like(q)
    Hkv, (H, D) = keys.shape[1], q.shape[2:]
    sb, sh, ss, _ = keys.stride()
    args = (q.data_ptr(), keys.data_ptr(), values.data_ptr(), plan.data_ptr(), out.data_ptr(), sb, sh, ss, Hkv,
            H // Hkv, D, torch.get_num_threads())
    if torch.autograd.profiler._is_profiler_enabled:  # a ctypes call is invisible to the profiler: name it
        with torch.profiler.record_function("ponder::native_attention"):
            rc = lib.ponder_attend(*args)
    else:
        rc = lib.ponder_attend(*args)
    if rc == -2:
        raise MemoryError("native attention: no memory for its scratch")
    if rc != 0:
        raise RuntimeError(f"native attention refused head dim {D}")
    return out
