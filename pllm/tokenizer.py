"""Byte-level BPE tokenizer (HF `tokenizers`) with pad/bos/eos/mask special tokens at ids 0..3, or an
imported checkpoint's own vocabulary, special-token ids and chat template.

An imported tokenizer is saved as HF saves one: tokenizer.json plus a tokenizer_config.json beside it with
the chat template and the special-token strings; our ids go under `pllm_special_token_ids`, which keeps a
mask token that HF does not name (LLaDA's <|mdm_mask|>)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .chat_template import render_chat

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>"]  # ids 0, 1, 2, 3 (ModelConfig defaults)
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_MAP_FILE = "special_tokens_map.json"
ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")
IDS_KEY = "pllm_special_token_ids"
# The named special tokens transformers passes to a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def token_string(config: dict, key: str) -> str | None:
    """A token in tokenizer_config.json: a plain string or the AddedToken form {"content": ...}."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def template_token_strings(config: dict) -> dict[str, str]:
    """The special-token strings a chat template sees (bos_token, eos_token, ...), as transformers passes them."""
    return {key: s for key in NAMED_TOKENS if (s := token_string(config, key)) is not None}


def read_tokenizer_config(folder: str | Path) -> dict:
    """A checkpoint folder's tokenizer_config.json ({} when absent), with `chat_template` resolved as
    transformers resolves it: chat_template.jinja wins over the key, and of a list of named templates the
    one named "default" is used. Without `added_tokens_decoder`, special_tokens_map.json is merged in, as
    transformers does for older checkpoints."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if "added_tokens_decoder" not in config and (folder / SPECIAL_MAP_FILE).is_file():
        config.update(json.loads((folder / SPECIAL_MAP_FILE).read_text(encoding="utf-8")))
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if template is not None:
        config["chat_template"] = template
    return config


def _check_ids(ids: dict[str, int], vocab: int) -> list[int]:
    if set(ids) != set(ID_FIELDS):
        raise ValueError(f"special_token_ids must have exactly the keys {list(ID_FIELDS)}, got {sorted(ids)}")
    for field in ID_FIELDS:
        value = ids[field]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise ValueError(f"special_token_ids.{field}={value!r} must be an int in [0, {vocab}) "
                             "(the tokenizer's vocabulary with added tokens)")
    if ids["mask_token_id"] in (ids["pad_token_id"], ids["bos_token_id"], ids["eos_token_id"]):
        raise ValueError(f"special_token_ids.mask_token_id={ids['mask_token_id']} must differ from the pad, "
                         "bos and eos ids")
    return [ids[f] for f in ID_FIELDS]


class Tokenizer:
    def __init__(self, hf_tokenizer: HFTokenizer, *, special_token_ids: dict[str, int] | None = None,
                 chat_template: str | None = None, token_strings: dict[str, str] | None = None):
        """special_token_ids None: our own tokenizer, with SPECIAL_TOKENS at fixed ids. token_strings: what a
        chat template sees as bos_token, eos_token, ... (default: the tokens at our special ids)."""
        self.hf = hf_tokenizer
        self._imported = special_token_ids is not None
        if special_token_ids is None:
            ids = [hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
            if None in ids:
                raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}")
        else:
            ids = _check_ids(dict(special_token_ids), hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id = ids
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"chat_template must be a string or None, got {type(chat_template).__name__}")
        self._chat_template = chat_template
        if token_strings is None:
            token_strings = {f.removesuffix("_id"): hf_tokenizer.id_to_token(i) for f, i in zip(ID_FIELDS, ids)}
        if unknown := set(token_strings) - set(NAMED_TOKENS):
            raise ValueError(f"token_strings keys must be among {list(NAMED_TOKENS)}, got {sorted(unknown)}")
        self.token_strings = dict(token_strings)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(zip(ID_FIELDS, (self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id)))

    def config(self) -> dict | None:
        """The tokenizer_config.json to save beside tokenizer.json; None for our own tokenizer without a
        chat template, which tokenizer.json describes fully."""
        if not self._imported and self._chat_template is None:
            return None
        config: dict = {"tokenizer_class": "PreTrainedTokenizerFast",
                        **dict.fromkeys(("bos_token", "eos_token", "pad_token", "mask_token")), **self.token_strings}
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        if self._imported:
            config[IDS_KEY] = self.special_token_ids
        return config

    @classmethod
    def from_config(cls, hf_tokenizer: HFTokenizer, config: dict) -> "Tokenizer":
        """From a tokenizer_config.json as `config()` writes it ({}: our own tokenizer, no template)."""
        return cls(hf_tokenizer, special_token_ids=config.get(IDS_KEY), chat_template=config.get("chat_template"),
                   token_strings=template_token_strings(config) if config else None)

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
        """From a folder or its tokenizer.json; a tokenizer_config.json beside it is read too."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        return cls.from_config(HFTokenizer.from_file(str(file)), read_tokenizer_config(file.parent))

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        """From `to_json()`'s output or a bare `tokenizers` JSON string."""
        data = json.loads(text)
        if isinstance(data, dict) and "pllm_tokenizer" in data:
            return cls.from_config(HFTokenizer.from_str(data["pllm_tokenizer"]), data["config"])
        return cls(HFTokenizer.from_str(text))

    def to_json(self) -> str:
        """One string to ship to actors; our own plain tokenizer stays the bare `tokenizers` JSON, so caches
        keyed by it stay valid."""
        config = self.config()
        if config is None:
            return self.hf.to_str()
        return json.dumps({"pllm_tokenizer": self.hf.to_str(), "config": config})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        target = path / TOKENIZER_FILE if path.is_dir() or not path.suffix else path
        target.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(target))
        config = self.config()
        if config is not None:
            text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
            (target.parent / CONFIG_FILE).write_text(text, encoding="utf-8")
        return target

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **variables) -> str | list[int]:
        """The chat rendered with this tokenizer's template, as transformers renders it; with tokenize, its ids
        (no special tokens added: the template writes them)."""
        if self._chat_template is None:
            raise ValueError("chat template: this tokenizer has none")
        text = render_chat(self._chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **{**self.token_strings, **variables})
        return self.encode(text) if tokenize else text

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
