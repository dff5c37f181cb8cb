"""Per-GPU memory and step time of a config's training and generation layouts.

Memory, training layout, per GPU of pipeline stage ``i`` (the worst stage decides):

* weights: (non-expert params / TP + TP-replicated params + routed-expert params / (EP *
  ETP)) * bytes of ``precision.params_dtype``; FP8 adds TE's row- and column-wise FP8
  copies of the GEMM weights (2 bytes per parameter, the blockwise recipe);
* gradients: the same count * 4 bytes: megatron's DDP keeps fp32 ``main_grad`` buffers
  (``grad_reduce_in_fp32``, see ``r1mega.training.policy``);
* optimizer: Adam's two fp32 moments, plus an fp32 master copy when the params are bf16
  (12 or 8 bytes per parameter), divided by DP for non-expert and by expert-DP for expert
  parameters with the distributed optimizer (ZeRO-1);
* activations: per layer and token, the tensors autograd keeps for backward, following
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", sbh(34 + 5as/h) for GPT) adjusted to these models: no dropout masks, fused /
  flash attention (Q, K, V, O and the log-sum-exp; no s^2 term, hence "selective"
  recompute saves nothing more), RMSNorm, SwiGLU, MLA's low-rank intermediates, and for
  MoE the router, each routed copy (top-k) of a token and the shared expert. All bf16
  (2 bytes), all divided by TP under sequence parallelism (only the head/FFN parts
  without it), by CP along the sequence; routed-expert FFN parts by ETP; routing is
  assumed balanced. ``full`` recompute keeps only each layer's input (2h bytes per token)
  plus one layer's full set while it is recomputed. A 1F1B pipeline keeps
  ``min(microbatches, PP - i)`` microbatches in flight on stage ``i``; every microbatch is
  taken at the full ``train.seq_length`` (packed sequences can reach it);
* logits on the last stage: tokens * vocab / TP * 6 bytes (bf16 logits + fp32
  log-softmax for the log-probs and entropy), once more per MTP layer;
* a fixed runtime reserve.

Memory, generation layout (the colocated rollout): generation-layout weights, the KV
cache for the whole rollout batch at ``train.seq_length`` tokens per sequence (MLA caches
the compressed latent, ``kv_lora_rank + qk_pos_emb_head_dim`` values per token and layer,
the same on every TP rank; GQA caches ``2 * groups * head_dim`` split over TP), the
sampling workspace, and the training-layout weights that stay resident for the next
update; gradients and optimizer states are assumed offloaded to host memory during the
rollout (reported separately).

Step time: rollout (prefill at a compute-bound MFU, decode bound by HBM reads of the
weights and the KV cache plus per-layer collective latencies), resharding (every GPU
receives its generation-layout weights over InfiniBand: an upper bound), and training
(``(3 + recompute + reference) * forward`` FLOPs at the stated MFU, stretched by the
pipeline bubble, plus EP all-to-all, TP and DP traffic with no overlap: an upper bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from parallel.layout import Layout
from r1mega.perf.flops import attention_score_flops
from r1mega.planner.hardware import Assumptions, GiB, Hardware
from r1mega.planner.params import (
    Block,
    ModelParams,
    count_parameters,
    is_moe_layer,
    mtp_block,
)
from r1mega.rollout import kv_footprint
from r1mega.training.length_schedule import at_largest_response_budget

__all__ = ["GenerationMemory", "Plan", "StageMemory", "StepTime", "kv_bytes_per_token_layer",
           "layer_activation_bytes", "make_plan", "stage_layers"]

_PARAM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACT_BYTES = 2  # bf16 activations
LOGIT_BYTES = 2 + 4  # bf16 logits + fp32 log-softmax kept for the log-prob/entropy grads


def stage_layers(layout: Layout, num_layers: int) -> list[range]:
    """Decoder layer indices of every pipeline stage (``pp_layers`` or an even split)."""
    counts = list(layout.pp_layers) if layout.pp_layers else [num_layers // layout.pp] * layout.pp
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def _stage_blocks(m: Any, layout: Layout, stage: int, params: ModelParams) -> tuple[Block, int]:
    """Parameters of pipeline stage ``stage`` (unsharded) and its number of MTP layers."""
    layers = stage_layers(layout, m.num_layers)[stage]
    block = Block()
    for i in layers:
        block = block + params.layers[i]
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        block = block + params.embedding
    mtp = 0
    if last:
        block = block + params.final_norm + params.output
        for b in params.mtp_layers:
            block = block + b
        mtp = len(params.mtp_layers)
        # The last stage needs the input embedding too when it is tied to the output
        # head or feeds the MTP layers; megatron keeps a synchronised copy there.
        if layout.pp > 1 and (m.tie_embeddings or mtp):
            block = block + params.embedding
    return block, mtp


# -- activations ------------------------------------------------------------------------
def _attention_act(m: Any, layout: Layout) -> float:
    """Bytes per token saved by one attention block (already divided over TP)."""
    h, a, t = m.hidden_size, m.num_attention_heads, layout.tp
    sp = layout.sequence_parallel or t == 1
    hidden = 2 * h  # norm input + projection input (the norm's output)
    if m.arch == "deepseek_v3":
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        low_rank = (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank
        if m.q_lora_rank:
            low_rank += 2 * m.q_lora_rank
        heads = a * (2 * qk + m.v_head_dim) + a * m.v_head_dim  # q, k, v, o
        # The low-rank parts come from duplicated projections on the (SP-sharded) input.
        replicated_like = hidden + low_rank
    else:
        d = m.kv_channels or h // a
        g = m.num_query_groups or a
        heads = (a + 2 * g) * d + a * d
        replicated_like = hidden
    per_token = ACT_BYTES * (replicated_like / (t if sp else 1) + heads / t) + 4 * a / t
    return per_token


def _mlp_act(m: Any, layout: Layout, moe: bool) -> float:
    """Bytes per token saved by one MLP block (dense SwiGLU or MoE), divided over TP."""
    h, t = m.hidden_size, layout.tp
    sp = layout.sequence_parallel or t == 1
    hidden = ACT_BYTES * 2 * h / (t if sp else 1)  # norm input + MLP/router input
    if not moe:
        return hidden + ACT_BYTES * 3 * m.ffn_hidden_size / t  # fc1 out (2f) + act out (f)
    f_e, f_s = m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size or 0
    router = 2 * 4 * m.num_experts / (t if sp else 1)  # fp32 logits + scores
    # Each of the top-k copies of a token: expert input (h), fc1 out (2f), act out (f),
    # expert output kept for the probability-weighted combine (h). Tokens are SP-sharded
    # before dispatch, so an EP rank sees on average its own share of copies.
    routed = m.moe_topk * ACT_BYTES * (2 * h + 3 * f_e / layout.etp) / (t if sp else 1)
    shared = ACT_BYTES * 3 * f_s / t
    return hidden + router + routed + shared


def layer_activation_bytes(m: Any, layout: Layout, index: int) -> float:
    """Bytes per token that decoder layer ``index`` keeps for backward on one GPU."""
    return _attention_act(m, layout) + _mlp_act(m, layout, is_moe_layer(m, index))


@dataclass
class StageMemory:
    """One training pipeline stage on one GPU, bytes."""

    stage: int
    layers: range
    dense_params: float
    expert_params: float
    weights: float
    fp8_copies: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    reserve: float
    in_flight: int

    @property
    def params(self) -> float:
        return self.dense_params + self.expert_params

    @property
    def total(self) -> float:
        return (self.weights + self.fp8_copies + self.grads + self.optimizer
                + self.activations + self.logits + self.reserve)

    def parts(self) -> dict[str, float]:
        return {"weights": self.weights, "fp8 weight copies": self.fp8_copies,
                "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits,
                "runtime reserve": self.reserve}


@dataclass
class GenerationMemory:
    """The generation layout on one GPU during the rollout, bytes."""

    dense_params: float
    expert_params: float
    weights: float
    kv_cache: float
    workspace: float
    train_weights: float
    reserve: float
    offloaded: float  # training grads + optimizer moved to host during the rollout
    sequences_per_replica: int  # decoded at once (rollout.max_batch_size slots at most)
    kv_bytes_per_token: float  # per GPU, all its layers
    decode_rounds: int = 1  # a replica's rollouts over its slots, one after another

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.workspace + self.train_weights + self.reserve

    def parts(self) -> dict[str, float]:
        return {"weights": self.weights, "KV cache": self.kv_cache,
                "sampling workspace": self.workspace,
                "training weights (resident)": self.train_weights,
                "runtime reserve": self.reserve}


@dataclass
class StepTime:
    """Seconds per GRPO step, by phase, and the bytes behind the communication terms."""

    prefill: float
    decode: float
    decode_per_token: float
    reshard: float
    reshard_bytes: float
    train_compute: float
    bubble: float
    train_comm: float
    train_flops: float
    ep_bytes: float
    dp_bytes: float
    tp_bytes: float
    offload: float

    @property
    def rollout(self) -> float:
        return self.prefill + self.decode

    @property
    def train(self) -> float:
        return self.train_compute * (1 + self.bubble) + self.train_comm

    @property
    def total(self) -> float:
        return self.rollout + self.reshard + self.offload + self.train


@dataclass
class Plan:
    """Everything `r1mega plan` prints."""

    world_size: int
    gpus_per_node: int
    gpu_mem_bytes: float
    params: ModelParams
    train_layout: Layout
    gen_layout: Layout
    stages: list[StageMemory]
    generation: GenerationMemory
    time: StepTime
    hardware: Hardware
    assumptions: Assumptions
    microbatches: int  # per DP rank and optimizer update
    tokens_per_microbatch: int
    problems: list[str] = field(default_factory=list)
    updates_per_step: int = 1  # grpo.minibatches x grpo.epochs_per_step

    @property
    def worst_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return not self.problems


def _largest(parts: dict[str, float]) -> str:
    name, value = max(parts.items(), key=lambda kv: kv[1])
    return f"largest: {name} {value / GiB:.1f} GiB"


def _train_memory(cfg: Any, layout: Layout, params: ModelParams, asm: Assumptions,
                  microbatches: int, tokens: int) -> list[StageMemory]:
    m, precision, train = cfg.model, cfg.precision, cfg.train
    pbytes = _PARAM_BYTES[precision.params_dtype]
    opt_bytes = 4 + 4 + (4 if pbytes < 4 else 0)  # m, v (+ fp32 master for bf16 params)
    shard_dense = layout.dp if train.use_distributed_optimizer else 1
    shard_expert = layout.expert_dp if train.use_distributed_optimizer else 1
    tokens_gpu = tokens / layout.cp
    sp = layout.sequence_parallel or layout.tp == 1
    out = []
    for stage, layers in enumerate(stage_layers(layout, m.num_layers)):
        block, mtp = _stage_blocks(m, layout, stage, params)
        dense = block.dense_per_gpu(layout.tp)
        experts = block.experts_per_gpu(layout.ep, layout.etp)
        embed_like = 0.0
        if stage == 0:
            embed_like += params.embedding.total / layout.tp
        if stage == layout.pp - 1:
            embed_like += params.output.total / layout.tp
        acts = [layer_activation_bytes(m, layout, i) for i in layers]
        acts += [layer_activation_bytes(m, layout, m.num_layers - 1)] * mtp
        in_flight = min(microbatches, layout.pp - stage)
        if train.recompute == "full":
            kept = len(acts) * ACT_BYTES * m.hidden_size / (layout.tp if sp else 1)
            activations = (in_flight * kept + max(acts)) * tokens_gpu
        else:
            activations = in_flight * sum(acts) * tokens_gpu
        logits = 0.0
        if stage == layout.pp - 1:
            logits = tokens_gpu * m.vocab_size / layout.tp * LOGIT_BYTES * (1 + mtp)
        out.append(StageMemory(
            stage=stage, layers=layers, dense_params=dense, expert_params=experts,
            weights=(dense + experts) * pbytes,
            fp8_copies=2 * (dense + experts - embed_like) if precision.fp8 else 0.0,
            grads=(dense + experts) * 4,
            optimizer=dense * opt_bytes / shard_dense + experts * opt_bytes / shard_expert,
            activations=activations, logits=logits, reserve=asm.runtime_reserve_gib * GiB,
            in_flight=in_flight,
        ))
    return out


def kv_bytes_per_token_layer(m: Any, tp: int, dtype_bytes: int = ACT_BYTES) -> float:
    """KV-cache bytes of one token in one layer on one GPU, as the rollout engine
    allocates them (:mod:`r1mega.rollout.kv_footprint`): MLA's latent and shared rotary
    key (not per-head K/V, and not split over TP), else this GPU's query groups' K and V."""
    return float(kv_footprint.kv_bytes_per_token(
        layers=1, dtype_bytes=dtype_bytes, tp=tp, mla=m.arch == "deepseek_v3",
        kv_lora_rank=m.kv_lora_rank or 0, rope_dim=m.qk_pos_emb_head_dim or 0,
        query_groups=m.num_query_groups or m.num_attention_heads,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads))


def _generation_memory(cfg: Any, layout: Layout, params: ModelParams, asm: Assumptions,
                       stages: list[StageMemory]) -> GenerationMemory:
    m = cfg.model
    pbytes = _PARAM_BYTES[cfg.precision.params_dtype]
    gen_stages = [_stage_blocks(m, layout, s, params)[0] for s in range(layout.pp)]
    # Rollouts need no MTP layers; the worst stage of the generation layout counts.
    worst = max(range(layout.pp), key=lambda s: (gen_stages[s].dense_per_gpu(layout.tp)
                                                  + gen_stages[s].experts_per_gpu(layout.ep,
                                                                                  layout.etp)))
    block = gen_stages[worst]
    if worst == layout.pp - 1:
        for b in params.mtp_layers:
            block = Block(block.sharded - b.sharded, block.replicated - b.replicated,
                          block.experts - b.experts)
    dense = block.dense_per_gpu(layout.tp)
    experts = block.experts_per_gpu(layout.ep, layout.etp)
    sequences = cfg.rollout.prompts_per_step * cfg.grpo.group_size
    # The engine decodes up to rollout.max_batch_size requests at once (rounded up to
    # the TP size) and sizes its KV buffer for them at full length, or takes
    # rollout.kv_cache_gib (r1mega.rollout.kv_footprint has the rule).
    slots = -(-cfg.rollout.max_batch_size // layout.tp) * layout.tp
    rollouts = math.ceil(sequences / layout.dp)
    per_replica = min(rollouts, slots)
    n_layers = len(stage_layers(layout, m.num_layers)[worst])
    kv_token = kv_bytes_per_token_layer(m, layout.tp, pbytes) * n_layers
    kv = kv_footprint.kv_buffer_bytes(
        bytes_per_token=int(kv_token), requests=per_replica,
        block=kv_footprint.block_tokens(m.arch == "deepseek_v3", cfg.rollout.kv_block_tokens),
        max_sequence_length=cfg.train.seq_length, kv_cache_gib=cfg.rollout.kv_cache_gib)
    workspace = per_replica * m.vocab_size / layout.tp * 4 * 2  # fp32 logits + probs
    worst_train = max(stages, key=lambda s: s.weights)
    offloaded = max(s.grads + s.optimizer for s in stages)
    return GenerationMemory(
        dense_params=dense, expert_params=experts, weights=(dense + experts) * pbytes,
        kv_cache=kv, workspace=workspace, train_weights=worst_train.weights,
        reserve=asm.runtime_reserve_gib * GiB, offloaded=offloaded,
        sequences_per_replica=per_replica, kv_bytes_per_token=kv_token,
        decode_rounds=math.ceil(rollouts / per_replica),
    )


def _span_nodes(group: int, gpus_per_node: int) -> float:
    """Fraction of a group's peers on other nodes (groups are packed node-first)."""
    if group <= 1:
        return 0.0
    local = min(group, gpus_per_node)
    return (group - local) / (group - 1)


def _link_time(nbytes: float, remote_fraction: float, hw: Hardware, asm: Assumptions) -> float:
    ib = nbytes * remote_fraction / (hw.ib_bytes_per_s * asm.link_efficiency)
    nvl = nbytes * (1 - remote_fraction) / (hw.nvlink_bytes_per_s * asm.link_efficiency)
    return ib + nvl


def _step_time(cfg: Any, plan_args: dict[str, Any], params: ModelParams, hw: Hardware,
               asm: Assumptions) -> StepTime:
    m, train = cfg.model, cfg.train
    tl: Layout = plan_args["train_layout"]
    gl: Layout = plan_args["gen_layout"]
    gen: GenerationMemory = plan_args["generation"]
    gpus_per_node: int = plan_args["gpus_per_node"]
    world = tl.world_size
    fp8 = bool(cfg.precision.fp8)
    seq = train.seq_length
    sequences = cfg.rollout.prompts_per_step * cfg.grpo.group_size
    response = min(cfg.rollout.max_new_tokens, seq)
    prompt = max(seq - response, 0)
    n_layers = m.num_layers
    matmul_active = params.activated - params.embedding.total  # lookups are not GEMMs
    if m.tie_embeddings:
        matmul_active += params.embedding.total  # the tied head is a GEMM

    # -- rollout ------------------------------------------------------------------------
    # Prefix caching: a group's first sample prefills the prompt, the others only the
    # part past its last whole KV block (megatron always recomputes at least one token).
    block = kv_footprint.block_tokens(m.arch == "deepseek_v3", cfg.rollout.kv_block_tokens)
    unshared = prompt - min((prompt // block) * block, max(prompt - 1, 0)) \
        if cfg.rollout.prefix_caching else prompt
    prefill_tokens = cfg.rollout.prompts_per_step * prompt + (
        sequences - cfg.rollout.prompts_per_step) * unshared
    prefill_flops = prefill_tokens * (
        2 * matmul_active + n_layers * attention_score_flops(m, prompt / 2))
    prefill = prefill_flops / (world * hw.bf16_flops * asm.prefill_mfu)
    # Decode step: read this GPU's weights and each decoding sequence's (on average
    # half-grown) KV once.
    batch = gen.sequences_per_replica
    avg_kv = batch * (prompt + response / 2) * gen.kv_bytes_per_token
    hbm = (gen.weights + avg_kv) / (hw.hbm_bytes_per_s * asm.decode_hbm_efficiency)
    decode_flops = batch * (2 * matmul_active + n_layers * attention_score_flops(
        m, prompt + response / 2)) / (gl.tp * gl.pp * gl.cp)
    compute = decode_flops / (hw.bf16_flops * asm.prefill_mfu)
    moe_layers = sum(is_moe_layer(m, i) for i in range(n_layers))
    tp_lat = 2 * n_layers * (asm.nvlink_latency_s if gl.tp > 1 else 0.0)
    ep_remote = _span_nodes(gl.ep, gpus_per_node)
    ep_lat = 2 * moe_layers * ((asm.ib_latency_s if ep_remote else asm.nvlink_latency_s)
                               if gl.ep > 1 else 0.0)
    per_token = max(hbm, compute) + tp_lat + ep_lat
    # More sequences per replica than the engine decodes at once: they go in waves.
    decode = gen.decode_rounds * response * per_token

    # -- resharding: every GPU receives its generation weights (upper bound) ----------
    reshard_bytes = gen.weights
    reshard = reshard_bytes / (hw.ib_bytes_per_s * asm.link_efficiency)
    offload = 2 * gen.offloaded / hw.pcie_bytes_per_s  # out before, back after the rollout

    # -- training -------------------------------------------------------------------------
    tokens = sequences * seq
    fwd_per_token = 2 * matmul_active + n_layers * attention_score_flops(m, seq / 2)
    mtp = m.mtp_num_layers
    if mtp:
        mtp_active = mtp_block(m).total
        if is_moe_layer(m, n_layers - 1):  # the experts a token is not routed to
            mtp_active -= (m.num_experts - m.moe_topk) * 3 * m.hidden_size * m.moe_ffn_hidden_size
        head = params.output.total or params.embedding.total
        fwd_per_token += mtp * (2 * (mtp_active + head) + attention_score_flops(m, seq / 2))
    updates = plan_args["updates"]
    old_pass = 1 if updates > 1 else 0  # old log-probs before several updates
    # fwd+bwd, recompute, reference, old log-probs
    passes = 3 + (1 if train.recompute == "full" else 0) + 1 + old_pass
    train_flops = passes * fwd_per_token * tokens
    train_compute = train_flops / (world * hw.peak_flops(fp8) * asm.train_mfu(fp8))
    microbatches = plan_args["microbatches"]
    bubble = (tl.pp - 1) / microbatches

    # Communication per GPU per step, not overlapped (upper bound).
    # train fwd (+ recompute) + reference (+ old log-probs)
    fwd_passes = (3 if train.recompute == "full" else 2) + old_pass
    tokens_gpu = tokens / (tl.dp * tl.cp * tl.tp)  # one DP rank's tokens, SP/CP-sharded
    layers_per_stage = max(len(r) for r in stage_layers(tl, n_layers))
    moe_frac = moe_layers / n_layers
    ep_bytes = 0.0
    if m.num_experts is not None and tl.ep > 1:
        ep_bytes = (tokens_gpu * layers_per_stage * moe_frac * m.moe_topk * m.hidden_size
                    * ACT_BYTES * 2 * (fwd_passes + 1) * (tl.ep - 1) / tl.ep)
    tp_bytes = 0.0
    if tl.tp > 1:  # 2 all-gathers + 2 reduce-scatters per layer and pass (SP)
        tp_bytes = (tokens_gpu * tl.tp * m.hidden_size * ACT_BYTES * 4 * layers_per_stage
                    * (fwd_passes + 1) * (tl.tp - 1) / tl.tp)
    worst = max(plan_args["stages"], key=lambda s: s.params)
    dp_bytes = 0.0
    if tl.dp > 1:  # reduce-scatter fp32 grads + all-gather bf16 params, every update
        dp_bytes += updates * worst.dense_params * (4 + 2) * (tl.dp - 1) / tl.dp
    if tl.expert_dp > 1:
        dp_bytes += updates * worst.expert_params * (4 + 2) * (tl.expert_dp - 1) / tl.expert_dp
    train_comm = (_link_time(ep_bytes, _span_nodes(tl.ep * tl.etp, gpus_per_node), hw, asm)
                  + _link_time(tp_bytes, _span_nodes(tl.tp, gpus_per_node), hw, asm)
                  + _link_time(dp_bytes, 1.0 if world > gpus_per_node else 0.0, hw, asm))
    return StepTime(prefill=prefill, decode=decode, decode_per_token=per_token, reshard=reshard,
                    reshard_bytes=reshard_bytes, train_compute=train_compute, bubble=bubble,
                    train_comm=train_comm, train_flops=train_flops, ep_bytes=ep_bytes,
                    dp_bytes=dp_bytes, tp_bytes=tp_bytes, offload=offload)


def make_plan(cfg: Any, world_size: int, gpus_per_node: int, gpu_mem_gib: float,
              hardware: Hardware | None = None,
              assumptions: Assumptions | None = None) -> Plan:
    """Estimate memory and time of ``cfg``'s layouts on ``world_size`` GPUs."""
    hw = hardware or Hardware()
    asm = assumptions or Assumptions()
    # Memory and time at the largest response budget of rollout.length_schedule.
    cfg = at_largest_response_budget(cfg)
    params = count_parameters(cfg.model)
    tl = Layout.from_config(cfg.train_layout, world_size, name="train_layout")
    gl = Layout.from_config(cfg.generation_layout, world_size, name="generation_layout")
    sequences = cfg.rollout.prompts_per_step * cfg.grpo.group_size
    # One optimizer update per minibatch (grpo.minibatches) and epoch.
    updates = cfg.grpo.minibatches * cfg.grpo.epochs_per_step
    microbatches = max(1, sequences // cfg.grpo.minibatches
                       // (tl.dp * cfg.train.micro_batch_size))
    tokens = cfg.train.seq_length * cfg.train.micro_batch_size
    stages = _train_memory(cfg, tl, params, asm, microbatches, tokens)
    generation = _generation_memory(cfg, gl, params, asm, stages)
    time = _step_time(cfg, {"train_layout": tl, "gen_layout": gl, "generation": generation,
                            "gpus_per_node": gpus_per_node, "microbatches": microbatches,
                            "updates": updates,
                            "stages": stages}, params, hw, asm)
    capacity = gpu_mem_gib * GiB
    problems = []
    for s in stages:
        if s.total > capacity:
            problems.append(
                f"train_layout ({tl.describe()}) pipeline stage {s.stage} (layers "
                f"{s.layers.start}-{s.layers.stop - 1}) needs {s.total / GiB:.1f} GiB per GPU, "
                f"{(s.total - capacity) / GiB:.1f} GiB more than the {gpu_mem_gib:g} GiB "
                f"available ({_largest(s.parts())})")
    if generation.total > capacity:
        problems.append(
            f"generation_layout ({gl.describe()}) needs {generation.total / GiB:.1f} GiB per "
            f"GPU, {(generation.total - capacity) / GiB:.1f} GiB more than the "
            f"{gpu_mem_gib:g} GiB available ({_largest(generation.parts())})")
    return Plan(world_size=world_size, gpus_per_node=gpus_per_node, gpu_mem_bytes=capacity,
                params=params, train_layout=tl, gen_layout=gl, stages=stages,
                generation=generation, time=time, hardware=hw, assumptions=asm,
                microbatches=microbatches, tokens_per_microbatch=tokens, problems=problems,
                updates_per_step=updates)

