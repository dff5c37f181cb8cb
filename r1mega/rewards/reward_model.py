"""Scores from a reward model, for prompts that have no verifiable answer.

DeepSeek-R1's second RL stage mixes reasoning prompts (rule rewards) with general ones
judged by a reward model. The reward model is a megatron model with a scalar head
(:mod:`r1mega.models.reward_model`), loaded from ``rewards.reward_model.load``: a Hugging
Face ``*ForSequenceClassification`` directory with one label (converted once into the
job's HF cache, :mod:`r1mega.checkpointing.hf_cache`, and reused while its files are
unchanged) or its conversion by ``r1mega convert hf-to-megatron``. It runs in the
*training* layout on the training ranks, like the reference policy:

* its weights stay in host memory between scoring passes and are copied to the device
  only while it scores (on a CPU-only machine the host is the device and they stay);
* rows are split over data-parallel ranks and microbatches, pass through megatron's
  pipeline schedule, and every rank receives every score.

The text scored is what the policy saw and wrote: the templated prompt followed by the
response, truncated from the left to the model's context (the end of the response is
where the score is read). A reward model directory with its own tokenizer files is read
with that tokenizer (a released reward model need not share the policy's vocabulary);
when that tokenizer has a chat template, the scored text is the conversation it formats
(the prompt as the user's turn, the response as the assistant's), as the model was
trained to score. Without tokenizer files the policy's tokenizer is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.platform import gpu_available
from r1mega.checkpointing.paths import SourceKind, WeightSource
from r1mega.config.from_weights import REWARD_MODEL_KEY, has_tokenizer, reward_model_source
from r1mega.data.templates import apply_template
from r1mega.data.tokenizers import HFTokenizer, Tokenizer
from r1mega.logging_utils import print_rank0


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=None, lengths=batch["lengths"])


def _keep_scores(batch: dict[str, torch.Tensor], scores: torch.Tensor):
    batch["scores"] = scores.detach().float()
    return scores.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}


class RewardModelScorer:
    """``score(prompts, responses)`` with a reward model (collective)."""

    def __init__(self, rm_cfg: Any, tokenizer: Tokenizer, template: str, layout_cfg: Any,
                 precision: Any, micro_batch_size: int = 4,
                 cache_root: str | Path | None = None) -> None:
        """``cache_root``: where an HF directory is converted (default: the cache of a job
        without a run directory, :func:`~r1mega.checkpointing.hf_cache.default_cache_root`;
        :meth:`for_job` passes the job's)."""
        from r1mega.checkpointing.model_io import load_model
        from r1mega.convert.hf_to_megatron import MODEL_CONFIG_NAME, load_model_config
        from r1mega.models import build_model
        from r1mega.training.policy import Policy

        source = reward_model_source(rm_cfg.load)
        checkpoint = self._checkpoint(source, precision.params_dtype, cache_root)
        model_cfg = load_model_config(checkpoint / MODEL_CONFIG_NAME)
        self.tokenizer, self.chat = self._scoring_tokenizer(source.path, tokenizer)
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            whose = "its tokenizer" if self.tokenizer is not tokenizer else \
                "the policy's tokenizer (it has no tokenizer files of its own)"
            raise ValueError(f"{REWARD_MODEL_KEY}={rm_cfg.load}: {whose} has "
                             f"{self.tokenizer.vocab_size} tokens but the reward model's "
                             f"embedding has {model_cfg.vocab_size} rows")
        # TE when it imports, as for the policy (older conversions saved `local`).
        model_cfg.transformer_impl = "auto"
        model = build_model(model_cfg, layout_cfg, precision)
        load_model([model], str(checkpoint))
        model.eval()
        self.model_cfg = model_cfg
        self.policy = Policy(chunks=[model], config=model.config)
        self.policy_tokenizer = tokenizer
        self.template = template
        self.scale = float(rm_cfg.scale)
        self.micro_batch_size = micro_batch_size
        self._host = _HostCopy(model) if gpu_available() else None

    @classmethod
    def for_job(cls, cfg: Any, tokenizer: Tokenizer) -> RewardModelScorer:
        """The reward model of job config ``cfg`` (``rewards.reward_model``), in its
        training layout and precision, an HF directory converted into the job's cache."""
        from r1mega.checkpointing.hf_cache import cache_root

        return cls(cfg.rewards.reward_model, tokenizer, cfg.data.template, cfg.train_layout,
                   cfg.precision, micro_batch_size=cfg.train.micro_batch_size,
                   cache_root=cache_root(cfg))

    @staticmethod
    def _checkpoint(source: WeightSource, params_dtype: str,
                    cache_root: str | Path | None) -> Path:
        """The megatron checkpoint to load: an HF directory's conversion (made by the
        first rank to need it; the command line makes it before the ranks start)."""
        from r1mega.checkpointing.hf_cache import converted_reward_model, default_cache_root

        if source.kind is not SourceKind.HF:
            assert source.checkpoint is not None
            return source.checkpoint
        root = Path(cache_root) if cache_root is not None else default_cache_root()
        checkpoint = converted_reward_model(source, root, params_dtype,
                                            log=lambda line: print(line, flush=True))
        print_rank0(f"[r1mega] reward model from {checkpoint} (converted from "
                    f"{source.path})")
        return checkpoint

    @staticmethod
    def _scoring_tokenizer(directory: Path, policy_tokenizer: Tokenizer
                           ) -> tuple[Tokenizer, bool]:
        """(the tokenizer the reward model reads, whether it formats a chat): the model
        directory's own when it has tokenizer files, else the policy's."""
        if not has_tokenizer(directory):
            return policy_tokenizer, False
        own = HFTokenizer(directory)
        return own, bool(own.chat_template)

    def _encode(self, prompt: str, response: str) -> list[int]:
        if self.chat:
            assert isinstance(self.tokenizer, HFTokenizer)
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": response}], tokenize=False)
        else:
            text = apply_template(self.template, prompt, self.policy_tokenizer) + response
        ids = self.tokenizer.encode(text)
        return ids[-self.model_cfg.max_position_embeddings:]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response), times ``rewards.reward_model.scale``; every
        rank passes all rows and receives all scores."""
        from megatron.core import parallel_state as ps

        if not prompts:
            return []
        dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = -(-len(prompts) // dp_size)
        mine = range(dp_rank * per_rank, min(len(prompts), (dp_rank + 1) * per_rank))
        local = torch.zeros(per_rank)
        if len(mine):
            rows = [self._encode(prompts[i], responses[i]) for i in mine]
            with self._on_device():
                local[:len(rows)] = self._score_rows(rows)
        gathered = [torch.zeros(per_rank) for _ in range(dp_size)]
        dist.all_gather(gathered, local, group=ps.get_data_parallel_group())
        return (torch.cat(gathered)[:len(prompts)] * self.scale).tolist()

    def _score_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """Scores of this DP rank's rows (last pipeline stage's, broadcast over PP)."""
        from megatron.core import parallel_state as ps

        from r1mega.training.schedule import forward_backward

        tp = ps.get_tensor_model_parallel_world_size()
        width = max(len(r) for r in rows)
        width += -width % tp  # sequence parallelism splits the sequence over TP
        microbatches = []
        for start in range(0, len(rows), self.micro_batch_size):
            chunk = rows[start:start + self.micro_batch_size]
            chunk = chunk + [chunk[-1]] * (self.micro_batch_size - len(chunk))
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, ids in enumerate(chunk):
                tokens[i, :len(ids)] = torch.tensor(ids)
            microbatches.append({
                "tokens": tokens,
                "position_ids": torch.arange(width).expand(len(chunk), -1).contiguous(),
                "lengths": torch.tensor([len(ids) for ids in chunk]),
            })
        forward_backward(self.policy, microbatches, _keep_scores, forward_only=True,
                         model_forward=partial(_forward))
        scores = torch.zeros(len(microbatches) * self.micro_batch_size)
        if ps.is_pipeline_last_stage():
            scores = torch.cat([mb["scores"].cpu() for mb in microbatches])
        last = dist.get_global_rank(ps.get_pipeline_model_parallel_group(),
                                    ps.get_pipeline_model_parallel_world_size() - 1)
        dist.broadcast(scores, src=last, group=ps.get_pipeline_model_parallel_group())
        return scores[:len(rows)]

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        if self._host is None:
            yield
            return
        self._host.load()
        try:
            yield
        finally:
            self._host.release()


class _HostCopy:
    """The model's weights in (pinned) host memory; device storage only while in use."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = [t for t in model.state_dict(keep_vars=True).values()
                        if isinstance(t, torch.Tensor)]
        self.host = [t.detach().to("cpu").pin_memory() for t in self.tensors]
        self.sizes = [t.untyped_storage().nbytes() for t in self.tensors]
        self.release()

    def load(self) -> None:
        for t, host, size in zip(self.tensors, self.host, self.sizes, strict=True):
            if t.untyped_storage().nbytes() == 0:
                t.untyped_storage().resize_(size)
            t.data.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    def release(self) -> None:
        for t in self.tensors:
            t.untyped_storage().resize_(0)
