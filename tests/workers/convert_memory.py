"""Peak host memory of checkpoint conversion (not part of the test suite; run by hand).

    python tests/workers/convert_memory.py slice <workdir>   # 2-layer DeepSeek-V3 slice
    python tests/workers/convert_memory.py tiny <workdir>    # the tiny test models

``slice`` writes a DeepSeek-V3 checkpoint with the released model's real shapes
(hidden 7168, 128 heads, q/kv LoRA 1536/512, vocab 129280, dense intermediate 18432,
expert intermediate 2048) but 2 layers (1 dense, 1 MoE) and 16 routed experts instead of
61 layers x 256, stored like the release (bfloat16, linear weights FP8 in 128x128 blocks
with float32 scales, float32 router bias), so each *tensor* has its real size. It then
converts HF -> Megatron (bfloat16) and Megatron -> HF in child processes and reports each
child's peak RSS next to a baseline child that only imports and plans (builds the
layout); the difference is the streaming cost, to compare with the largest tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RELEASED = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "attention_bias": False, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 16, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 2, "num_key_value_heads": 128, "num_nextn_predict_layers": 0,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}


def _quantize(w):  # type: ignore[no-untyped-def]
    """128x128 block FP8 quantization, vectorized (edge blocks padded)."""
    import torch

    rows, cols = w.shape
    pr, pc = -rows % 128, -cols % 128
    padded = torch.nn.functional.pad(w.float(), (0, pc, 0, pr))
    blocks = padded.view((rows + pr) // 128, 128, (cols + pc) // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(rows + pr, cols + pc)[:rows, :cols].contiguous(), scale


def make_slice(directory: Path) -> None:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    c = RELEASED
    g = torch.Generator().manual_seed(0)
    h, heads = c["hidden_size"], c["num_attention_heads"]
    weight_map: dict[str, str] = {}

    def randn(*shape: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.bfloat16)
        for start in range(0, shape[0], 4096):  # bounded float32 temporaries
            rows = out[start:start + 4096]
            rows.copy_(0.02 * torch.randn(rows.shape, generator=g))
        return out

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    def linear(out: dict[str, torch.Tensor], name: str, rows: int, cols: int) -> None:
        q, s = _quantize(randn(rows, cols))
        out[name], out[name + "_scale_inv"] = q, s

    save("embed.safetensors", {"model.embed_tokens.weight": randn(c["vocab_size"], h)})
    for i in range(c["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", {}
        qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "self_attn.q_a_layernorm.weight"] = torch.ones(c["q_lora_rank"],
                                                             dtype=torch.bfloat16)
        t[p + "self_attn.kv_a_layernorm.weight"] = torch.ones(c["kv_lora_rank"],
                                                              dtype=torch.bfloat16)
        linear(t, p + "self_attn.q_a_proj.weight", c["q_lora_rank"], h)
        linear(t, p + "self_attn.q_b_proj.weight", heads * qk, c["q_lora_rank"])
        linear(t, p + "self_attn.kv_a_proj_with_mqa.weight",
               c["kv_lora_rank"] + c["qk_rope_head_dim"], h)
        linear(t, p + "self_attn.kv_b_proj.weight",
               heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
        linear(t, p + "self_attn.o_proj.weight", h, heads * c["v_head_dim"])
        if i < c["first_k_dense_replace"]:
            for n in ("gate", "up"):
                linear(t, f"{p}mlp.{n}_proj.weight", c["intermediate_size"], h)
            linear(t, p + "mlp.down_proj.weight", h, c["intermediate_size"])
        else:
            e, ffn = c["n_routed_experts"], c["moe_intermediate_size"]
            t[p + "mlp.gate.weight"] = randn(e, h)
            t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(e)
            for x in [f"experts.{j}" for j in range(e)] + ["shared_experts"]:
                for n in ("gate", "up"):
                    linear(t, f"{p}mlp.{x}.{n}_proj.weight", ffn, h)
                linear(t, f"{p}mlp.{x}.down_proj.weight", h, ffn)
        save(f"layer{i}.safetensors", t)
    save("head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                              "lm_head.weight": randn(c["vocab_size"], h)})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(RELEASED, indent=2))


def _child(code: str) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of a child Python process running ``code``."""
    # VmHWM, not getrusage's ru_maxrss: after exec the latter still includes the parent's
    # peak (this process may hold the generated slice), VmHWM is the child's own.
    report = ("\nfor line in open('/proc/self/status'):\n    if line.startswith('VmHWM'):"
              "\n        print('PEAK_KIB', line.split()[1])")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code + report], check=True, cwd=ROOT,
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
                              "PATH": "/usr/bin:/bin"})
    peak = int(out.stdout.split("PEAK_KIB")[-1].split()[0])
    return time.time() - start, peak / 2**20


def measure(hf_dir: Path, work: Path, label: str) -> None:
    plan = (f"import json\nfrom r1mega.convert.hf_config import model_config_from_hf\n"
            f"from r1mega.convert.megatron_layout import model_layout\n"
            f"model_layout(model_config_from_hf(json.load(open('{hf_dir}/config.json'))), "
            f"'bfloat16')")
    h2m = (f"from r1mega.convert import convert_hf_to_megatron\n"
           f"convert_hf_to_megatron('{hf_dir}', '{work}/meg')")
    m2h = (f"from r1mega.convert import convert_megatron_to_hf\n"
           f"convert_megatron_to_hf('{work}/meg', '{work}/hf_out')")
    import shutil

    for out in ("meg", "hf_out"):
        shutil.rmtree(work / out, ignore_errors=True)
    for name, code in (("baseline (imports + layout)", plan), ("hf -> megatron", h2m),
                       ("megatron -> hf", m2h)):
        seconds, gib = _child(code)
        print(f"{label}: {name}: peak RSS {gib:.2f} GiB, {seconds:.0f} s", flush=True)


def main(what: str, workdir: str) -> None:
    work = Path(workdir)
    if what == "slice":
        hf_dir = work / "hf_slice"
        if not (hf_dir / "config.json").exists():
            make_slice(hf_dir)
        size = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")) / 2**30
        print(f"slice: {size:.2f} GiB of safetensors (largest tensor: embedding / head "
              f"129280 x 7168 bf16 = 1.73 GiB)")
        measure(hf_dir, work, "slice")
    else:
        sys.path.insert(0, str(ROOT))
        from tests.test_convert import LAYOUTS, _make_hf_checkpoint

        for name in LAYOUTS:
            (work / name).mkdir(parents=True)
            _make_hf_checkpoint(name, work / name / "hf")
            measure(work / name / "hf", work / name, name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
