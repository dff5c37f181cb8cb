"""A user's path from a released Hugging Face model to RL and back, as the README tells it.

The commands are read from the README's "The same on a tiny CPU model" block and run in a
fresh directory: a tiny Qwen2 with a BPE tokenizer trained on the spot goes through
``r1mega train`` (TP=2, straight from the HF directory), ``r1mega eval`` on the run,
``r1mega convert megatron-to-hf`` and ``r1mega generate``, and, straight from the HF
directory again, ``r1mega sample`` and ``r1mega sft`` (2 processes each, started with
``--nproc 2``, reusing the RL run's conversion); a tiny DeepSeek-V3 with an MTP layer, in
the FP8 release format, trains at PP=2 and exports back to FP8. Checked against
independent references:

* ``transformers`` loads the export (config, shards + index, tokenizer, chat template,
  generation config) and its greedy tokens equal ``r1mega generate``'s on the run, and
  ``r1mega generate`` on the exported directory itself at TP=2 under torchrun;
* the FP8 export is, bit for bit, a per-block amax/448 quantization (written out here) of
  the bf16 export's weights, with the MTP layer kept; re-importing it dequantizes to the
  reference formula;
* the conversion cache is reused while the source is unchanged and replaced when a file
  changes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import ROOT

transformers = pytest.importorskip("transformers")

HEADING = "### The same on a tiny CPU model"


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme[readme.index(HEADING):], re.S)
    assert block, "no bash block under the heading"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _env(tmp: Path) -> dict[str, str]:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "WANDB_MODE": "offline", "R1MEGA_CACHE_DIR": str(tmp / "cache")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return env


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    proc = subprocess.run(argv, cwd=cwd, env=_env(cwd), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _reference_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: scale = amax / 448, q = e4m3(w / scale), as the release."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            blk = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            s = w[blk].float().abs().max().clamp_min(1e-12) / 448.0
            q[blk] = (w[blk].float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            scale[i, j] = s
    return q, scale


@pytest.fixture(scope="module")
def walked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    work = tmp_path_factory.mktemp("hf_user")
    for name in ("configs", "tools"):
        (work / name).symlink_to(ROOT / name)
    commands = readme_commands()
    assert [shlex.split(c)[:3] for c in commands] == [
        ["python", "tools/make_tiny_hf_model.py", "qwen2"], ["r1mega", "train",
                                                              "configs/hf_tiny_cpu.yaml"],
        ["r1mega", "eval", "runs/hf/rl"], ["r1mega", "convert", "megatron-to-hf"],
        ["r1mega", "generate", "runs/hf/rl"], ["r1mega", "sample", "configs/hf_tiny_cpu.yaml"],
        ["r1mega", "sft", "configs/hf_tiny_cpu.yaml"],
        ["python", "tools/make_tiny_hf_model.py", "deepseek_v3"],
        ["r1mega", "train", "configs/hf_tiny_cpu.yaml"], ["r1mega", "convert", "megatron-to-hf"]]
    outputs = [_run(shlex.split(c), work).stdout for c in commands]
    return work, outputs


def test_rl_from_the_hf_directory_then_eval_on_the_run(walked: tuple[Path, list[str]]) -> None:
    work, out = walked
    train = out[1]
    assert "train layout TP=2" in train and "model qwen2 (2 layers, hidden 64)" in train
    assert train.count("[r1mega] converting models/tiny-qwen2") == 1
    assert [ln.split(" | ")[0] for ln in train.splitlines() if ln.startswith("step ")] == [
        "step 1/2", "step 2/2"]
    assert "[r1mega eval] 4 problems | pass@1 (k=2" in out[2]
    v3 = out[8]
    assert "train layout TP=1 PP=2" in v3 and "model deepseek_v3 (4 layers" in v3
    assert "step 2/2" in v3


def test_sample_and_sft_from_the_hf_directory_at_two_processes(
        walked: tuple[Path, list[str]]) -> None:
    work, out = walked
    sample, sft = out[5], out[6]
    for job in (sample, sft):
        # Two ranks, the model from config.json, the RL run's conversion reused.
        assert "[r1mega] 2 process(es) via torchrun; train layout TP=2" in job
        assert "model qwen2 (2 layers, hidden 64)" in job
        assert "(converted from models/tiny-qwen2)" in job and "converting" not in job
    stats = json.loads((work / "runs" / "hf" / "samples" / "stats.json").read_text())
    rows = (work / "runs" / "hf" / "samples" / "dataset.jsonl").read_text().splitlines()
    assert stats["complete"] and stats["kept"] == len(rows) == 8
    run = json.loads((work / "runs" / "hf" / "samples" / "run.json").read_text())
    assert run["tokenizer"] == {"type": "hf", "path": "models/tiny-qwen2"}
    assert "sft data runs/hf/samples/dataset.jsonl: 8 rows read" in sft
    assert [ln.split(" | ")[0] for ln in sft.splitlines() if ln.startswith("step ")] == [
        "step 1/1"]
    meta = json.loads((work / "runs" / "hf" / "sft" / "step_00000001" / "r1mega_meta.json")
                      .read_text())
    assert meta["world_size"] == 2


def test_transformers_loads_the_export_and_decodes_what_r1mega_generates(
        walked: tuple[Path, list[str]]) -> None:
    work, _ = walked
    export = work / "runs" / "hf" / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in export.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    for name in ("config.json", "tokenizer.json", "generation_config.json",
                 "chat_template.jinja"):
        assert (export / name).is_file(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("assistant\n")
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    records = [json.loads(line) for line in
               (work / "runs" / "hf" / "greedy.jsonl").read_text().splitlines()]
    from r1mega.data.templates import apply_template

    for record in records:
        assert tokenizer(apply_template("r1_zero", record["prompt"]),
                         add_special_tokens=False)["input_ids"] == record["prompt_ids"]
        with torch.no_grad():
            ids = torch.tensor([record["prompt_ids"]])
            want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=12)[0, ids.shape[1]:].tolist()
        got = record["completion_ids"]
        assert got == want[:len(got)] and len(set(got)) > 2, (got, want)
        if len(got) < 12:  # stopped at EOS, as transformers does
            assert want[len(got) - 1] == tokenizer.eos_token_id

    # The exported directory is itself a model every command takes: generate from it at
    # TP=2 under torchrun (job arguments after "--", --nproc matching the world).
    from r1mega.launch import free_port

    prompts = [a for r in records for a in ("--prompt", r["prompt"])]
    proc = _run(["python", "-m", "torch.distributed.run", "--nproc-per-node", "2",
                 "--master-port", str(free_port()), "-m", "r1mega.cli", "--", "generate",
                 str(export), *prompts, "--template", "r1_zero", "--temperature", "0",
                 "--max-new-tokens", "12", "--nproc", "2", "train_layout.tp=2",
                 "generation_layout.tp=2", "--output", str(work / "tp2.jsonl")], work)
    assert f"cache/{export.name}-" in proc.stdout and "(converted from" in proc.stdout
    tp2 = [json.loads(line) for line in (work / "tp2.jsonl").read_text().splitlines()]
    assert [r["completion_ids"] for r in tp2] == [r["completion_ids"] for r in records]


def test_fp8_export_is_the_block_quantization_of_the_bf16_weights(
        walked: tuple[Path, list[str]], tmp_path: Path) -> None:
    from r1mega.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from r1mega.convert.fp8 import weight_dequant

    work, _ = walked
    run, fp8_dir = work / "runs" / "hf" / "v3", work / "runs" / "hf" / "v3-export-fp8"
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    bf16_dir = tmp_path / "bf16"
    convert_megatron_to_hf(run, bf16_dir, dtype="bfloat16")
    bf16, fp8 = _tensors(bf16_dir), _tensors(fp8_dir)
    scaled = sorted(n[:-len("_scale_inv")] for n in fp8 if n.endswith("_scale_inv"))
    assert any("experts.0.down_proj" in n for n in scaled)
    assert any(n.startswith("model.layers.4.") for n in scaled)  # the MTP layer survives
    assert not any("eh_proj" in n or "embed" in n or "lm_head" in n for n in scaled)
    assert any(fp8[n].shape[0] > 128 for n in scaled)  # several row blocks somewhere
    for name in scaled:
        q, scale = _reference_fp8(bf16[name])
        assert fp8[name].dtype == torch.float8_e4m3fn
        assert torch.equal(fp8[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(fp8[name + "_scale_inv"], scale), name
    for name, tensor in bf16.items():
        if name not in scaled and not name.endswith("e_score_correction_bias"):
            assert torch.equal(fp8[name], tensor), name
    # Read back through the converter: the reference dequantization of every block.
    convert_hf_to_megatron(fp8_dir, tmp_path / "meg")
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "again", dtype="bfloat16")
    again = _tensors(tmp_path / "again")
    for name in scaled:
        assert torch.equal(again[name], weight_dequant(fp8[name], fp8[name + "_scale_inv"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_conversion_cache_is_reused_until_a_file_changes(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from r1mega.checkpointing import hf_cache
    from r1mega.checkpointing.paths import resolve_weight_source

    hf = tmp_path / "model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x" * 16)
    calls: list[Path] = []

    def fake_convert(source: Path, entry: Path, options: object) -> None:
        calls.append(entry)
        entry.mkdir()

    monkeypatch.setattr(hf_cache, "_convert", fake_convert)
    options = hf_cache.ConversionOptions(dtype="float32")
    source = resolve_weight_source(str(hf))
    first = hf_cache.converted_checkpoint(source, tmp_path / "cache", options, log=str)
    assert hf_cache.converted_checkpoint(source, tmp_path / "cache", options, log=str) == first
    assert calls == [first]
    (hf / "model.safetensors").write_bytes(b"y" * 17)  # a re-download
    second = hf_cache.converted_checkpoint(source, tmp_path / "cache", options, log=str)
    assert second != first and calls == [first, second] and not first.exists()
    other = hf_cache.converted_checkpoint(source, tmp_path / "cache",
                                          hf_cache.ConversionOptions(dtype="bfloat16"), log=str)
    assert other not in (first, second) and second.exists()
