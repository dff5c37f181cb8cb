"""Scores from a reward model, for prompts that have no verifiable answer.

DeepSeek-R1's second RL stage mixes reasoning prompts (rule rewards) with general ones
judged by a reward model. The reward model is a megatron model with a scalar head
(:mod:`r1mega.models.reward_model`), converted from a Hugging Face sequence classifier,
and runs in the *training* layout on the training ranks, like the reference policy:

* its weights stay in host memory between scoring passes and are copied to the device
  only while it scores (on a CPU-only machine the host is the device and they stay);
* rows are split over data-parallel ranks and microbatches, pass through megatron's
  pipeline schedule, and every rank receives every score.

The text scored is what the policy saw and wrote: the templated prompt followed by the
response, truncated from the left to the model's context (the end of the response is
where the score is read).
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
from r1mega.data.templates import apply_template


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=None, lengths=batch["lengths"])


def _keep_scores(batch: dict[str, torch.Tensor], scores: torch.Tensor):
    batch["scores"] = scores.detach().float()
    return scores.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}


class RewardModelScorer:
    """``score(prompts, responses)`` with a converted reward model (collective)."""

    def __init__(self, rm_cfg: Any, tokenizer: Any, template: str, layout_cfg: Any,
                 precision: Any, micro_batch_size: int = 4) -> None:
        from r1mega.checkpointing.model_io import load_model
        from r1mega.convert.hf_to_megatron import MODEL_CONFIG_NAME, load_model_config
        from r1mega.models import build_model
        from r1mega.training.policy import Policy

        path = Path(rm_cfg.load)
        config_file = path / MODEL_CONFIG_NAME
        if not config_file.exists():
            raise FileNotFoundError(
                f"rewards.reward_model.load={rm_cfg.load}: no {MODEL_CONFIG_NAME} there; "
                "convert a Hugging Face *ForSequenceClassification checkpoint with "
                "`r1mega convert hf-to-megatron`")
        model_cfg = load_model_config(config_file)
        if model_cfg.head != "scalar":
            raise ValueError(f"rewards.reward_model.load={rm_cfg.load} holds a model with "
                             f"head={model_cfg.head!r}, not a reward model (head: scalar)")
        # TE when it imports, as for the policy (older conversions saved `local`).
        model_cfg.transformer_impl = "auto"
        model = build_model(model_cfg, layout_cfg, precision)
        load_model([model], str(path))
        model.eval()
        self.model_cfg = model_cfg
        self.policy = Policy(chunks=[model], config=model.config)
        self.tokenizer = tokenizer
        self.template = template
        self.scale = float(rm_cfg.scale)
        self.micro_batch_size = micro_batch_size
        self._host = _HostCopy(model) if gpu_available() else None

    def _encode(self, prompt: str, response: str) -> list[int]:
        ids = self.tokenizer.encode(apply_template(self.template, prompt, self.tokenizer)
                                    + response)
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
