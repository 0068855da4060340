"""Byte-level BPE tokenizer (HF `tokenizers`) with pad/bos/eos/mask special tokens at ids 0..3."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>"]  # ids 0, 1, 2, 3 (ModelConfig defaults)
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    def __init__(self, hf_tokenizer: HFTokenizer):
        self.hf = hf_tokenizer
        ids = [hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}")
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id = ids

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        tok = HFTokenizer(models.BPE())
        # Byte-level: every string is representable, no unknown token. Keep whitespace runs (code
        # indentation) inside tokens rather than splitting them off per character.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        return cls(HFTokenizer.from_file(str(path / TOKENIZER_FILE if path.is_dir() else path)))

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        target = path / TOKENIZER_FILE if path.is_dir() or not path.suffix else path
        target.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(target))
        return target

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def iter_token_ids(self, texts: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
        """Tokenize a stream of documents in batches; each document is followed by EOS."""
        chunk: list[str] = []
        for text in texts:
            chunk.append(text)
            if len(chunk) == batch:
                yield from (ids + [self.eos_token_id] for ids in self.encode_batch(chunk))
                chunk = []
        if chunk:
            yield from (ids + [self.eos_token_id] for ids in self.encode_batch(chunk))
