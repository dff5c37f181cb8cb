"""Can this machine train in FP8 with the configured recipe? Probe once, explain refusals.

FP8 GEMMs come from Transformer Engine (TE) and need an FP8 tensor-core GPU. Without a
guard, a missing piece surfaces late and obscurely: megatron-core 0.19.2 builds a TE recipe
only at the first forward pass (``fp8_utils.get_fp8_recipe`` raises a generic "only
supported recipes" error when the installed TE is too old for the recipe), and TE refuses
an unsupported GPU inside ``fp8_autocast``. The checks here run when the model config is
built, before any weight is allocated, and name the config keys involved.

What each recipe needs (megatron-core 0.19.2 + TE; DeepSeek-V3's is ``blockwise``):

* ``delayed``: per-tensor scales from an amax history; TE >= 1.0, compute capability
  (CC) >= 8.9;
* ``tensorwise``: per-tensor current scaling; TE >= 2.2.0.dev0, CC >= 8.9;
* ``blockwise``: 1x128 activation tiles and 128x128 weight blocks, each with its own
  scale (DeepSeek-V3's recipe); TE >= 2.3.0.dev0, CC >= 9.0, CUDA >= 12.9;
* ``mxfp8``: 32-element blocks with E8M0 scales; TE >= 2.1.0, CC >= 10.0 (Blackwell).

Compute capability 8.9 (Ada) additionally needs CUDA >= 12.1. When TE imports, its own
verdict per recipe (``FP8GlobalStateManager.is_*_available``) is asked as well, so a rule
TE adds later is still reported before training starts.

:func:`probe_fp8_platform` is the only function that touches the machine; every decision
is a pure function of an :class:`Fp8Platform`, so the CPU tests cover all the branches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RECIPE_NEEDS",
    "Fp8Platform",
    "Fp8Unavailable",
    "RecipeNeeds",
    "check_fp8_supported",
    "fp8_problem",
    "probe_fp8_platform",
]


@dataclass(frozen=True)
class RecipeNeeds:
    """What one FP8 recipe needs from Transformer Engine, the GPU and CUDA."""

    scaling: str
    min_te: str
    min_capability: tuple[int, int]
    gpus: str  # the architectures that satisfy min_capability, for messages
    min_cuda: str | None = None


RECIPE_NEEDS: dict[str, RecipeNeeds] = {
    "delayed": RecipeNeeds("per-tensor delayed scaling", "1.0", (8, 9), "Ada, Hopper, Blackwell"),
    "tensorwise": RecipeNeeds("per-tensor current scaling", "2.2.0.dev0", (8, 9),
                              "Ada, Hopper, Blackwell"),
    "blockwise": RecipeNeeds("1x128 / 128x128 block scaling (DeepSeek-V3)", "2.3.0.dev0",
                             (9, 0), "Hopper, Blackwell", min_cuda="12.9"),
    "mxfp8": RecipeNeeds("MXFP8 32-element block scaling", "2.1.0", (10, 0), "Blackwell"),
}
# Ada (compute capability 8.9) runs FP8 GEMMs from CUDA 12.1 on.
ADA_MIN_CUDA = "12.1"


@dataclass(frozen=True)
class Fp8Platform:
    """What the machine offers for FP8: the GPU, CUDA, and Transformer Engine."""

    gpu_name: str | None = None  # None: no CUDA GPU
    compute_capability: tuple[int, int] | None = None
    cuda_version: str | None = None  # torch.version.cuda
    te_version: str | None = None  # None: transformer_engine.pytorch does not import
    te_error: str | None = None  # why TE did not import
    # TE's own verdict per recipe name: (supported, reason), when TE imports.
    te_recipe_support: dict[str, tuple[bool, str]] = field(default_factory=dict)


class Fp8Unavailable(RuntimeError):
    """FP8 was asked for but this machine cannot run it; ``reason`` is a short form for
    tables (benchmark rows) and the message is the full explanation."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _version(text: str) -> Any:
    from packaging.version import Version

    return Version(text.split("+")[0])


def _te_recipe_support() -> dict[str, tuple[bool, str]]:
    """TE's own answer per recipe (module moved from ``fp8`` to ``quantization`` in TE 2.x)."""
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except Exception:  # noqa: BLE001 - older TE, or a partial install
        try:
            from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
        except Exception:  # noqa: BLE001
            return {}
    queries = {"delayed": "is_fp8_available", "tensorwise": "is_fp8_available",
               "blockwise": "is_fp8_block_scaling_available", "mxfp8": "is_mxfp8_available"}
    verdicts: dict[str, tuple[bool, str]] = {}
    for recipe, name in queries.items():
        query = getattr(FP8GlobalStateManager, name, None)
        if query is None:
            continue
        try:
            ok, reason = query()
        except Exception as err:  # noqa: BLE001 - a query that fails is a refusal
            ok, reason = False, f"{type(err).__name__}: {err}"
        verdicts[recipe] = (bool(ok), str(reason))
    return verdicts


@functools.lru_cache(maxsize=1)
def probe_fp8_platform() -> Fp8Platform:
    """Look at this machine once: GPU, CUDA, whether TE imports (any exception counts as
    "does not import": a TE install without a driver raises OSError) and TE's verdicts."""
    import torch

    if not torch.cuda.is_available():
        return Fp8Platform(te_error="not tried: no CUDA GPU")
    gpu = dict(gpu_name=torch.cuda.get_device_name(),
               compute_capability=tuple(torch.cuda.get_device_capability()),
               cuda_version=torch.version.cuda)
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return Fp8Platform(**gpu, te_error=f"{type(err).__name__}: {err}")
    te_version = getattr(transformer_engine, "__version__", None)
    if te_version is None:
        from importlib.metadata import version

        te_version = version("transformer-engine")
    return Fp8Platform(**gpu, te_version=str(te_version), te_recipe_support=_te_recipe_support())


def fp8_problem(precision: Any, platform: Fp8Platform,
                transformer_impl: str = "auto") -> Fp8Unavailable | None:
    """Why ``precision`` cannot train in FP8 on ``platform`` (None when it can, or when
    FP8 is off). Pure: tests pass made-up platforms."""
    if precision is None or not precision.fp8:
        return None
    key = f"precision.fp8={precision.fp8}"
    recipe = precision.fp8_recipe
    off = f"Set precision.fp8=null to train in {precision.params_dtype}."
    if transformer_impl == "local":
        return Fp8Unavailable(
            f"{key} runs its GEMMs in Transformer Engine layers, but "
            "model.transformer_impl=local builds megatron-core's local layers; use "
            f"model.transformer_impl=auto or transformer_engine. {off}",
            "model.transformer_impl=local has no FP8 GEMMs")
    needs = RECIPE_NEEDS.get(recipe)
    if needs is None:
        return Fp8Unavailable(
            f"precision.fp8_recipe={recipe} is not one of: {', '.join(RECIPE_NEEDS)}",
            f"unknown recipe {recipe}")
    if platform.gpu_name is None:
        return Fp8Unavailable(
            f"{key} needs Transformer Engine on an FP8-capable GPU (compute capability >= "
            f"8.9: Ada, Hopper, Blackwell; `pip install 'r1mega[gpu]'`); this machine has "
            f"no CUDA GPU. {off}",
            "needs Transformer Engine on an FP8 GPU (no CUDA GPU here)")
    gpu = f"{platform.gpu_name} (compute capability {_cc(platform.compute_capability)})"
    if platform.te_version is None:
        return Fp8Unavailable(
            f"{key} needs Transformer Engine on an FP8-capable GPU; this machine has {gpu} "
            f"but transformer_engine.pytorch does not import ({platform.te_error}); "
            f"`pip install 'r1mega[gpu]'`. {off}",
            "needs Transformer Engine on an FP8 GPU (Transformer Engine does not import)")
    cc = platform.compute_capability or (0, 0)
    if cc < needs.min_capability:
        return Fp8Unavailable(
            f"{key} with precision.fp8_recipe={recipe} ({needs.scaling}) needs a GPU of "
            f"compute capability >= {_cc(needs.min_capability)} ({needs.gpus}); found {gpu}. "
            f"{off}",
            f"needs an FP8 GPU (compute capability >= {_cc(needs.min_capability)}); "
            f"found {_cc(cc)}")
    if _version(platform.te_version) < _version(needs.min_te):
        return Fp8Unavailable(
            f"precision.fp8_recipe={recipe} ({needs.scaling}) needs transformer-engine >= "
            f"{needs.min_te} (megatron-core builds that recipe only from there on); found "
            f"{platform.te_version}. Upgrade TE or choose another precision.fp8_recipe.",
            f"needs transformer-engine >= {needs.min_te}")
    min_cuda = needs.min_cuda or (ADA_MIN_CUDA if cc == (8, 9) else None)
    cuda = platform.cuda_version
    if min_cuda is not None and (cuda is None or _version(cuda) < _version(min_cuda)):
        return Fp8Unavailable(
            f"precision.fp8_recipe={recipe} ({needs.scaling}) needs CUDA >= {min_cuda} on "
            f"{gpu}; torch was built with CUDA {cuda}.",
            f"needs CUDA >= {min_cuda}")
    verdict = platform.te_recipe_support.get(recipe)
    if verdict is not None and not verdict[0]:
        return Fp8Unavailable(
            f"Transformer Engine {platform.te_version} refuses precision.fp8_recipe={recipe} "
            f"on {gpu}: {verdict[1]}",
            f"Transformer Engine refuses it: {verdict[1]}")
    return None


def check_fp8_supported(precision: Any, transformer_impl: str = "auto",
                        platform: Fp8Platform | None = None) -> None:
    """Raise :class:`Fp8Unavailable` when FP8 is asked for and cannot run here."""
    if precision is None or not precision.fp8:
        return
    problem = fp8_problem(precision, platform or probe_fp8_platform(), transformer_impl)
    if problem is not None:
        raise problem


def _cc(capability: tuple[int, int] | None) -> str:
    return "none" if capability is None else f"{capability[0]}.{capability[1]}"
