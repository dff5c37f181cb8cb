"""The start-up every job shares, from the process group to the policy's first weights.

RL (:mod:`r1mega.trainer`), SFT and distillation (:mod:`r1mega.sft.trainer`),
evaluation, generation and rejection sampling all begin the same way: join the job's
process group (torchrun, srun or one plain process), build megatron's process groups for
``train_layout``, seed, build the tokenizer (refused when it has more tokens than the
model's embedding has rows), build this rank's stage of the policy and load its initial
weights from whatever kind of path names them (:mod:`r1mega.checkpointing.paths`): a
Hugging Face directory is converted once into a cache first
(:mod:`r1mega.checkpointing.hf_cache`), a warm start's base model pretrained once.
:class:`Job` is that sequence, in the spirit of torchtitan's trainer set-up: each step
is one method, so a job that must interleave its own work (SFT reads its data with the
tokenizer before it builds the model; rejection sampling opens its output directory
first) calls them in its own order, and none of them repeats one.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.checkpointing.hf_cache import converted_hf_model
from r1mega.checkpointing.paths import (
    SourceKind,
    WeightSource,
    WeightSourceError,
    resolve_weight_source,
)
from r1mega.data.tokenizers import Tokenizer, build_model_tokenizer
from r1mega.logging_utils import print_rank0
from r1mega.training.policy import Policy, build_policy


def weight_source(spec: str | Path, key: str = "checkpoint.load") -> WeightSource:
    """:func:`resolve_weight_source`, with the config key (or argument) in the error."""
    try:
        return resolve_weight_source(spec)
    except WeightSourceError as err:
        raise WeightSourceError(f"{key}={spec}: {err}") from None


class Job:
    """This rank's place in the job and what every job builds on it (collective)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.env = init_distributed(default_port=cfg.launch.master_port)
        self.layout = Layout.from_config(cfg.train_layout, self.env.world_size,
                                         name="train_layout")
        initialize_layout(self.layout)

    def describe(self) -> str:
        """The start-up line of a training job (printed by rank 0)."""
        model = self.cfg.model
        return (f"[r1mega] {self.env.world_size} process(es) via {self.env.launcher}; "
                f"train layout {self.layout.describe()}; model {model.arch} "
                f"({model.num_layers} layers, hidden {model.hidden_size})")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """``cfg.tokenizer``, checked against ``model.vocab_size``."""
        return build_model_tokenizer(self.cfg)

    def build_policy(self, training: bool = False, seed: int | None = None) -> Policy:
        """This rank's stage of the policy, initialised from ``seed`` (default
        ``train.seed``); ``training`` adds the recompute setting and the distributed
        optimizer's gradient buffers."""
        cfg = self.cfg
        manual_seed(cfg.train.seed if seed is None else seed)
        if not training:
            return build_policy(cfg.model, cfg.train_layout, cfg.precision)
        return build_policy(cfg.model, cfg.train_layout, cfg.precision, cfg.train.recompute,
                            use_distributed_optimizer=cfg.train.use_distributed_optimizer)

    def checkpoint_of(self, source: WeightSource) -> Path:
        """The megatron checkpoint ``source`` names, made first if it must be (a warm
        start's base model is pretrained on first use; collective)."""
        if source.kind is SourceKind.WARM_START:
            # The demo's base-model pretraining: imported here only, on demand, so that
            # it stays off every job's import path.
            from r1mega.pretrain import ensure_base_model

            print_rank0(f"[r1mega] base model: {source.spec} (pretrained on first use, "
                        "then cached)")
            return Path(ensure_base_model(self.cfg, source.path))
        if source.kind is SourceKind.HF:
            # Whichever rank takes the cache's lock first converts, and says so.
            return converted_hf_model(self.cfg, source,
                                      log=lambda line: print(line, flush=True))
        assert source.checkpoint is not None
        return source.checkpoint

    def load_weights(self, policy: Policy, spec: str | Path | WeightSource | None,
                     key: str = "checkpoint.load") -> Path | None:
        """Load the weights ``spec`` names (any kind of weights path, or one already
        resolved) into ``policy``; returns the checkpoint loaded, or ``None`` when
        ``spec`` is empty."""
        from r1mega.checkpointing.model_io import load_model

        if not spec:
            return None
        source = spec if isinstance(spec, WeightSource) else weight_source(spec, key)
        checkpoint = self.checkpoint_of(source)
        load_model(policy.chunks, str(checkpoint))
        origin = f" (converted from {source.path})" if source.kind is SourceKind.HF else ""
        print_rank0(f"[r1mega] initial weights from {checkpoint}{origin}")
        return checkpoint


def start_job(cfg: Any, weights: str | Path | None, training: bool = False,
              seed: int | None = None) -> tuple[Job, Policy]:
    """The whole start-up in order: process groups, layout, tokenizer, policy, weights."""
    job = Job(cfg)
    job.tokenizer  # noqa: B018 - built (and vocabulary-checked) before the model
    policy = job.build_policy(training=training, seed=seed)
    job.load_weights(policy, weights)
    return job, policy
