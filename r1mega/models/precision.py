"""The project's ``precision`` config, translated into megatron-core's config fields.

One place decides what "bf16" and "fp8" mean for the model and for the optimizer, so the
model provider, the optimizer builder and the benchmarks cannot disagree:

* **Model weights and activations** are ``precision.params_dtype`` (bf16 on GPUs; fp32 on
  the CPU machines). With ``precision.fp8`` set, the GEMMs of the Transformer Engine
  linear layers (attention projections, dense and expert MLPs) run in FP8 under the
  configured recipe; the weights stay bf16 (``fp8_param=False``), and attention itself,
  norms, the router, the embedding and the output head stay in bf16, as in DeepSeek-V3's
  FP8 framework (its report keeps those components in higher precision).
* **Optimizer**: megatron-core's Adam keeps fp32 master weights and fp32 moments by
  default. ``precision.main_params_dtype`` / ``exp_avg_dtype`` / ``exp_avg_sq_dtype`` set
  to ``bfloat16`` switch on megatron's precision-aware optimizer (TE's FusedAdam inside
  the distributed optimizer): bf16 master weights and/or bf16 moments. DeepSeek-V3 kept
  fp32 master weights and bf16 moments.
* **Generation** (the rollout engine) runs with bf16 weights and bf16 GEMMs: FP8 GEMMs in
  decoding would re-quantize every bf16 weight on every step (more HBM traffic, not less)
  and need batch padding to FP8 GEMM alignment; FP8 *weights* for generation need the
  generation model built with FP8 parameters (see :mod:`r1mega.models.fp8_blocks`).

Every function here is pure (config in, kwargs out), so the mapping is unit-tested on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "OPTIMIZER_DTYPE_KEYS",
    "check_optimizer_precision_supported",
    "generation_precision",
    "optimizer_precision_kwargs",
    "transformer_precision_kwargs",
    "uses_precision_aware_optimizer",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTIMIZER_DTYPE_KEYS = ("main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")


def _params_dtype(precision: Any | None) -> torch.dtype:
    return DTYPES[precision.params_dtype] if precision is not None else torch.float32


def transformer_precision_kwargs(precision: Any | None) -> dict[str, Any]:
    """``TransformerConfig`` fields for ``precision`` (None: fp32, no FP8).

    The FP8 recipe names are megatron-core's (``delayed``, ``tensorwise`` = per-tensor
    current scaling, ``blockwise`` = DeepSeek-V3's 1x128/128x128 block scaling, ``mxfp8``).
    The amax history settings only matter to delayed scaling and are passed only for it.
    """
    dtype = _params_dtype(precision)
    kwargs: dict[str, Any] = {"params_dtype": dtype, "bf16": dtype == torch.bfloat16,
                              "pipeline_dtype": dtype}
    if precision is None or not precision.fp8:
        return kwargs
    kwargs.update(
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe,
        fp8_wgrad=True,  # weight gradients in FP8 too (DeepSeek-V3's Wgrad GEMM)
        fp8_param=False,  # bf16 weights; FP8 copies are made per GEMM by TE
        fp8_dot_product_attention=False,  # attention stays bf16
        fp8_multi_head_attention=False,
    )
    if precision.fp8_recipe == "delayed":
        kwargs.update(fp8_amax_history_len=precision.fp8_amax_history_len,
                      fp8_amax_compute_algo=precision.fp8_amax_compute_algo)
    return kwargs


def uses_precision_aware_optimizer(precision: Any | None) -> bool:
    """True when any optimizer tensor is asked to be narrower than fp32."""
    return precision is not None and any(
        getattr(precision, key) != "float32" for key in OPTIMIZER_DTYPE_KEYS)


def optimizer_precision_kwargs(precision: Any | None) -> dict[str, Any]:
    """``OptimizerConfig`` fields for ``precision``.

    ``bf16``/``params_dtype`` follow the model weights (megatron then keeps fp32 master
    copies). ``fp8_recipe`` is what megatron's distributed optimizer reads to handle FP8
    parameters. Narrow master weights or moments need megatron's precision-aware
    optimizer, which only exists as TE's FusedAdam inside the distributed optimizer.
    """
    dtype = _params_dtype(precision)
    kwargs: dict[str, Any] = {"bf16": dtype == torch.bfloat16, "params_dtype": dtype}
    if precision is None:
        return kwargs
    if precision.fp8:
        kwargs["fp8_recipe"] = precision.fp8_recipe
    if uses_precision_aware_optimizer(precision):
        kwargs["use_precision_aware_optimizer"] = True
        for key in OPTIMIZER_DTYPE_KEYS:
            kwargs[key] = DTYPES[getattr(precision, key)]
    return kwargs


def check_optimizer_precision_supported(precision: Any | None, te_imports: bool) -> None:
    """Refuse narrow optimizer dtypes without Transformer Engine, naming the keys.

    megatron-core would fail too, but inside ``OptimizerConfig`` with a message about a
    command-line flag the project does not have.
    """
    if not uses_precision_aware_optimizer(precision) or te_imports:
        return
    keys = ", ".join(f"precision.{k}={getattr(precision, k)}" for k in OPTIMIZER_DTYPE_KEYS
                     if getattr(precision, k) != "float32")
    raise RuntimeError(
        f"{keys} needs megatron-core's precision-aware optimizer, which runs on Transformer "
        "Engine's FusedAdam (a GPU and `pip install 'r1mega[gpu]'`); Transformer Engine does "
        "not import here. Set them to float32 (fp32 master weights and Adam moments)."
    )


def generation_precision(precision: Any | None) -> Any | None:
    """``precision`` for the generation-layout model: the same weight dtype, no FP8 GEMMs
    (see the module docstring for why decoding stays in bf16)."""
    if precision is None or not precision.fp8:
        return precision
    if dataclasses.is_dataclass(precision) and not isinstance(precision, type):
        return dataclasses.replace(precision, fp8=None)
    from omegaconf import OmegaConf

    return OmegaConf.merge(precision, {"fp8": None})
