#!/usr/bin/env python3
"""megatron distributed checkpoint (any layout) -> Hugging Face safetensors (= `r1mega
convert megatron-to-hf`). Example: python tools/convert_megatron_to_hf.py ./ckpt/step_00000100
./hf_out --hf-config ./Qwen2.5-7B"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1mega.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("megatron-to-hf"))
