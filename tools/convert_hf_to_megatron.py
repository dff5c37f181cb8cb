#!/usr/bin/env python3
"""Hugging Face safetensors -> megatron distributed checkpoint (= `r1mega convert
hf-to-megatron`). Example: python tools/convert_hf_to_megatron.py ./Qwen2.5-7B ./qwen_meg"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1mega.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("hf-to-megatron"))
