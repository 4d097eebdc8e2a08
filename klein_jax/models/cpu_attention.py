"""The fused float32 CPU attention kernel (cpu_attention.cc): built once per machine, registered with XLA, called.

XLA's CPU backend runs attention as separate ops (the logits' product, the softmax passes, the values' product), each
streaming a chunk of logits through memory; the kernel keeps a block of queries' logits in the core's cache from the
first product to the last (docs/benchmarks.md: the medium benchmark's attention 13 -> 8 ms). It computes the
"chunked" backend's function (attention.chunked_attention: flash attention's order, float32) on jax's (B, S, H, Dh)
layout, with key_value_seq_lengths and optionally a causal mask (the text encoder's).

It is C++ written with GCC's vector extensions, built from source with the host's compiler (`$CXX`, else g++, c++ or
clang++; -O3 -march=native) against the XLA FFI headers jax ships, into a cache folder keyed by the source, jaxlib
version, compiler and CPU (`$KLEIN_JAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/klein-jax/kernels`, else
~/.cache/klein-jax/kernels). The first build takes a few seconds; later processes load the library. Without a
compiler that builds it (GCC; clang is untested), or with KLEIN_JAX_CPU_KERNEL=0, the "fused" backend is unavailable
and CPU float32 attention stays on "chunked"; `unavailable_reason()` says why.

Gradients: the kernel has no backward; jax.grad runs "chunked"'s (a custom_vjp that recomputes the forward in XLA).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
TARGET = "klein_cpu_attention"  # the FFI target name XLA's custom call carries
SYMBOL = "KleinCpuAttention"  # the handler the library exports
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
LANES = 16  # the kernel's vector width in floats: head dims must be multiples of it
DISABLE_ENV = "KLEIN_JAX_CPU_KERNEL"  # "0": never build or use the kernel


def cache_folder() -> pathlib.Path:
    """Where built kernels are kept: $KLEIN_JAX_KERNEL_CACHE, $XDG_CACHE_HOME/klein-jax/kernels or ~/.cache/..."""
    if os.environ.get("KLEIN_JAX_KERNEL_CACHE"):
        return pathlib.Path(os.environ["KLEIN_JAX_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "klein-jax" / "kernels"


def find_compiler() -> str | None:
    """$CXX, else the first of g++, c++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def _cpu_signature() -> str:
    """The host CPU's model and feature flags (-march=native code must not run on another CPU)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The host CPU's feature flags (/proc/cpuinfo), empty where there is no such file."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def build(compiler: str, folder: pathlib.Path | None = None, source: pathlib.Path | None = None) -> pathlib.Path:
    """Compiles a kernel's C++ `source` (this module's SOURCE) into `folder` (cache_folder()) unless a build of that
    source (and the headers beside it) for this host is there. Returns the shared library's path; a failed
    compilation is a RuntimeError carrying the compiler's output. (klein_jax/models/cpu_conv.py builds its kernel
    here too.)
    """
    import jaxlib

    folder = folder or cache_folder()
    source = source or SOURCE
    headers = [header.read_text() for header in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, jaxlib.__version__, compiler, " ".join(FLAGS),
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    library = folder / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    log.info("building the CPU kernel %s (once per machine) into %s", source.name, library)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = pathlib.Path(scratch) / library.name
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), "-I", str(source.parent), str(source), "-o",
                   str(partial)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        os.replace(partial, library)  # atomic: a concurrent process sees no library or a whole one
    return library


def load_kernel(source: pathlib.Path, symbols: dict[str, str], what: str,
                unsupported: Callable[[], str | None] = lambda: None) -> str | None:
    """Builds (if needed) and loads the kernel of `source`, registering each FFI target name -> exported symbol of
    `symbols` with XLA; None if it can run, else why not (KLEIN_JAX_CPU_KERNEL=0, `unsupported()`'s reason, no
    compiler, a failed build). `what` ends the warning: what runs instead."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"disabled by {DISABLE_ENV}=0"
    if (reason := unsupported()) is not None:
        return reason
    compiler = find_compiler()
    if compiler is None:
        return "no C++ compiler found ($CXX, c++, g++, clang++)"
    try:
        library = ctypes.cdll.LoadLibrary(str(build(compiler, source=source)))
        for target, symbol in symbols.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as error:
        log.warning("the CPU kernel %s is unavailable, %s: %s", source.name, what, error)
        return str(error)
    return None


@functools.cache
def _load() -> str | None:
    """Builds (if needed), loads and registers the kernel once per process; None if it is available, else why not."""
    def unsupported():
        machine = platform.machine()
        return None if machine.lower() in ("x86_64", "amd64", "aarch64", "arm64") else f"no kernel for {machine}"

    return load_kernel(SOURCE, {TARGET: SYMBOL}, "attention stays on 'chunked'", unsupported)


def unavailable_reason() -> str | None:
    """None if the kernel can run in this process, else why it cannot (building it on first call)."""
    return _load()


def available() -> bool:
    """Whether the kernel can run here (builds it on first call)."""
    return _load() is None


def supports(q, k) -> bool:
    """Whether the kernel takes these operands: float32 (B, S, H, Dh), Dh a multiple of 16, K dividing H."""
    return (q.ndim == 4 and k.ndim == 4 and q.dtype == jnp.float32 and k.dtype == jnp.float32
            and q.shape[-1] % LANES == 0 and q.shape[2] % k.shape[2] == 0)


def _call(q, k, v, lengths, causal):
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")(
        q, k, v, lengths, causal=np.int32(causal))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, lengths, causal):
    return _call(q, k, v, lengths, causal)


def _forward(q, k, v, lengths, causal):
    return _call(q, k, v, lengths, causal), (q, k, v, lengths)


def _backward(causal, residuals, cotangent):
    from klein_jax.models.attention import chunked_attention

    q, k, v, lengths = residuals
    mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None] if causal else None
    _, pullback = jax.vjp(lambda q, k, v: chunked_attention(q, k, v, lengths, mask=mask), q, k, v)
    return (*pullback(cotangent), None)


_attention.defvjp(_forward, _backward)


def fused_attention(q, k, v, key_value_seq_lengths=None, *, is_causal: bool = False):
    """Softmax attention through the kernel: q (B, Sq, H, Dh), k and v (B, Skv, K, Dh) float32 (supports()), scale
    1/sqrt(Dh); key_value_seq_lengths (B,) attends only the first n[b] keys (a row of none weighs all alike);
    is_causal: query i also attends only keys 0..i (top-left aligned, as jax.nn.dot_product_attention)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the fused CPU attention kernel is unavailable: {reason}")
    if not supports(q, k) or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention 'fused' takes float32 q (B, Sq, H, Dh) and k, v (B, Skv, K, Dh) with Dh a "
                         f"multiple of {LANES} and K dividing H; got {q.shape} {q.dtype}, {k.shape} {k.dtype}")
    lengths = (jnp.full((q.shape[0],), k.shape[1], jnp.int32) if key_value_seq_lengths is None
               else jnp.asarray(key_value_seq_lengths, jnp.int32))
    return _attention(q, k, v, lengths, bool(is_causal))
