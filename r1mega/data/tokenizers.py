"""A minimal tokenizer interface and its three backends (bytes, sentencepiece, HF).

The trainer only needs text <-> ids plus the special ids used for padding, stopping
and (optionally) a leading BOS, so that is all :class:`Tokenizer` promises; this keeps
rollout/reward code independent of which library produced the vocabulary.

``encode`` never inserts special tokens on its own: prompts are built by a template
(a chat template already contains BOS text, so an automatic one would double it), and
the caller prepends ``bos_id`` explicitly where a model wants it. ``decode`` drops
special tokens by default because decoded text feeds reward functions, which must not
see ``</s>`` or padding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class Tokenizer(ABC):
    """What the trainer needs from a tokenizer."""

    name: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (pad/bos/eos) dropped unless asked for."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """Id that ends a generation."""

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """Id used to pad batches (falls back to ``eos_id`` when the vocab has none)."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """Id a sequence may start with, or ``None`` when the vocab has none."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (the model's embedding table must be at least this large)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus pad=256, bos=257, eos=258 (vocab 259).

    Needs no files, so CPU tests and tiny smoke runs work offline, and it round-trips any
    string exactly. Decoding invalid UTF-8 (a generation cut mid-character) replaces the
    broken bytes instead of raising, since rollouts can stop anywhere.
    """

    PAD, BOS, EOS = 256, 257, 258
    VOCAB_SIZE = 259

    def __init__(self) -> None:
        self.name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        names = {self.PAD: "<pad>", self.BOS: "<s>", self.EOS: "</s>"}
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            out.append(names.get(i, f"<unk:{i}>"))
        out.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(out)

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def bos_id(self) -> int | None:
        return self.BOS

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file (Llama-1/2-style vocabularies)."""

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.name = f"sentencepiece:{path}"
        if self.sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {path} has no EOS piece; generation "
                             f"could never stop")

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            # sentencepiece already drops control pieces (bos/eos/pad) when decoding.
            return self.sp.decode(list(ids))
        # Decode runs of ordinary pieces together: decoding piece by piece would lose the
        # word-boundary spaces that sentencepiece restores only in context.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if self.sp.is_control(i):
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        pad = self.sp.pad_id()
        return int(pad) if pad >= 0 else self.eos_id

    @property
    def bos_id(self) -> int | None:
        bos = self.sp.bos_id()
        return int(bos) if bos >= 0 else None

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory (``tokenizer.json`` etc.), loaded offline.

    ``local_files_only=True`` because training nodes usually have no internet and a
    silent hub download of a different revision would change the vocabulary.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # transformers is an optional (dev) dependency
            raise ImportError("tokenizer.type=hf needs the 'transformers' package "
                              "(pip install transformers)") from e
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"Hugging Face tokenizer directory not found: {p}")
        self.hf: Any = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        self.name = f"hf:{p}"
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer at {p} has no eos_token; generation could never stop")

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.hf.pad_token_id
        return int(pad) if pad is not None else self.eos_id

    @property
    def bos_id(self) -> int | None:
        bos = self.hf.bos_token_id
        return int(bos) if bos is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # includes added tokens, unlike hf.vocab_size

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """Pass-through, so an ``HFTokenizer`` can stand in for the HF object."""
        return self.hf.apply_chat_template(messages, **kwargs)


TOKENIZER_TYPES = ("hf", "sentencepiece", "bytes")


def build_tokenizer(tokenizer_cfg: Any) -> Tokenizer:
    """The tokenizer a :class:`TokenizerConfig` describes, with config-key error messages."""
    kind = tokenizer_cfg.type
    if kind == "bytes":
        return ByteTokenizer()
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"unknown tokenizer.type {kind!r}: expected one of "
                         f"{', '.join(TOKENIZER_TYPES)}")
    path = tokenizer_cfg.path
    if not path:
        what = "a tokenizer directory" if kind == "hf" else "a .model file"
        raise ValueError(f"tokenizer.path must be set ({what}) for tokenizer.type={kind}")
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer.path {path} does not exist "
                                f"(tokenizer.type={kind})")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)


def build_model_tokenizer(cfg: Any) -> Tokenizer:
    """The job's tokenizer (``cfg.tokenizer``), refused when it has more tokens than the
    model's embedding has rows (``model.vocab_size``): those ids would index past it."""
    tokenizer = build_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={cfg.model.vocab_size}")
    return tokenizer
