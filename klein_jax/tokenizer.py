"""Prompt tokenizer: the Qwen3 chat template + Qwen2 byte-level BPE, as Flux2KleinPipeline._get_qwen3_prompt_embeds.

The BPE runs in the HF `tokenizers` library (framework-free, Rust); a tokenizer folder (tokenizer.json,
tokenizer_config.json, chat_template.jinja) is read the way transformers 5 reads it for Qwen2Tokenizer. The chat
template is rendered by klein_jax/chat_template.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers

from klein_jax.chat_template import compile_chat_template

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the template here; it wins over the config's
MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline max_sequence_length

# transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD_TOKEN = "<|endoftext|>"  # Qwen2Tokenizer's pad_token default and the Qwen3 checkpoints' pad
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
# The BPE options Qwen2Tokenizer.__init__ passes (transformers 5), which override those in tokenizer.json.
_QWEN2_BPE_OPTIONS = {"dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

def set_qwen2_pipeline(tokenizer: Tokenizer, *, add_prefix_space: bool = False) -> None:
    """Normaliser, pre-tokenizer and decoder exactly as transformers' Qwen2Tokenizer.__init__ builds them."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()


class PromptTokenizer:
    """Prompt -> (input_ids, attention_mask) exactly as Flux2KleinPipeline._get_qwen3_prompt_embeds tokenizes."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, *,
                 special_tokens: Mapping[str, str | None] | None = None, padding_side: str = "right",
                 truncation_side: str = "right"):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name}={side!r} is not one of 'left', 'right'")
        special_tokens = {"pad_token": PAD_TOKEN} if special_tokens is None else special_tokens
        pad_token = special_tokens.get("pad_token") or PAD_TOKEN
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.pad_token = pad_token
        self.pad_id = pad_id
        self.padding_side, self.truncation_side = padding_side, truncation_side
        # Named special tokens are template variables too (transformers passes tokenizer.special_tokens_map).
        self._template_vars = {k: v for k, v in special_tokens.items() if k in _NAMED_SPECIAL_TOKENS and v is not None}
        self._template = compile_chat_template(chat_template)
        self._json = tokenizer.to_str()
        self._fixed_length: dict[int, Tokenizer] = {}  # max_length -> a copy that truncates and pads to it
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "PromptTokenizer":
        """Loads a tokenizer folder (tokenizer.json, tokenizer_config.json, optional chat_template.jinja)."""
        path = pathlib.Path(path)
        config = _read_json_file(path / TOKENIZER_CONFIG_FILE)
        tokenizer = _load_tokenizer_json(path / TOKENIZER_FILE, config)
        _add_config_tokens(tokenizer, config, path / TOKENIZER_CONFIG_FILE)
        special = {k: _token_content(config[k]) for k in _NAMED_SPECIAL_TOKENS if k in config}
        special.setdefault("pad_token", PAD_TOKEN)
        sides = {k: config[k] for k in ("padding_side", "truncation_side") if config.get(k) is not None}
        try:
            return cls(tokenizer, _read_chat_template(path, config), special_tokens=special, **sides)
        except ValueError as e:
            raise ValueError(f"{path / TOKENIZER_CONFIG_FILE}: {e}") from None

    def render(self, prompt: str) -> str:
        """The chat-formatted text of one prompt (apply_chat_template, generation prompt on, thinking off)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        messages = [{"role": "user", "content": str.__str__(prompt)}]
        return self._template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                     **{**self._template_vars, "enable_thinking": False})

    def encode(self, prompts: str | Sequence[str],
               max_length: int = MAX_SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int32 (B, max_length): padded with the pad id and cut to max_length.

        Qwen3 checkpoints pad and cut on the right (transformers' defaults), as the pipeline does.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length={max_length!r} must be a positive int")
        texts = [self.render(p) for p in prompts]
        encodings = self._fixed_length_tokenizer(max_length).encode_batch(texts)
        shape = (len(texts), max_length)  # (B, L), also for B = 0
        input_ids = np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(shape)
        attention_mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32).reshape(shape)
        return input_ids, attention_mask

    def _fixed_length_tokenizer(self, max_length: int) -> Tokenizer:
        # padding="max_length", truncation=True (longest_first); sides from tokenizer_config.json, default right.
        with self._lock:
            if max_length not in self._fixed_length:
                tokenizer = Tokenizer.from_str(self._json)
                tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first",
                                            direction=self.truncation_side)
                tokenizer.enable_padding(direction=self.padding_side, pad_id=self.pad_id, pad_token=self.pad_token,
                                         length=max_length)
                self._fixed_length[max_length] = tokenizer
            return self._fixed_length[max_length]


def _read_json_file(path: pathlib.Path, what: str = "tokenizer config file") -> dict[str, Any]:
    """A JSON object from `path`; errors name the file as `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _load_tokenizer_json(path: pathlib.Path, config: Mapping[str, Any]) -> Tokenizer:
    """tokenizer.json, read the way transformers 5 reads it for the tokenizer_class named in the config.

    For Qwen2Tokenizer, transformers keeps only the file's vocabulary, merges, added tokens and post-processor and
    takes the BPE options, normaliser, pre-tokenizer and decoder from the class, whatever the file says: do the same.
    """
    data = _read_json_file(path, "tokenizer file")
    qwen2 = config.get("tokenizer_class") in _QWEN2_CLASSES
    if qwen2 and isinstance(data.get("model"), dict):
        if data["model"].get("type") != "BPE":
            raise ValueError(f"tokenizer file {path}: a Qwen2Tokenizer needs a BPE model, "
                             f"got {data['model'].get('type')!r}")
        data["model"].update(_QWEN2_BPE_OPTIONS)
    try:
        tokenizer = Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # the Rust loader raises a bare Exception on malformed content
        raise ValueError(f"tokenizer file {path} is not a valid tokenizers file: {e}") from None
    if qwen2:
        set_qwen2_pipeline(tokenizer, add_prefix_space=bool(config.get("add_prefix_space") or False))
    return tokenizer


def _token_content(value: Any) -> str | None:
    """A special token entry of tokenizer_config.json: a string, null, or a serialised AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _add_config_tokens(tokenizer: Tokenizer, config: Mapping[str, Any], config_path: pathlib.Path) -> None:
    """Adds the added_tokens_decoder entries missing from tokenizer.json (transformers adds them from the config)."""
    entries = config.get("added_tokens_decoder", {})
    if not isinstance(entries, dict):
        raise ValueError(f"{config_path}: added_tokens_decoder must be an object, got {type(entries).__name__}")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    for index, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str):
            raise ValueError(f"{config_path}: added_tokens_decoder[{index}] has no string 'content'")
        if content in vocab:
            if vocab[content] != int(index):
                raise ValueError(f"{config_path}: added token {content!r} has id {index}, "
                                 f"but tokenizer.json gives it id {vocab[content]}")
            continue
        token = AddedToken(content, special=entry.get("special", False), normalized=entry.get("normalized", True),
                           lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                           single_word=entry.get("single_word", False))
        (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
        if tokenizer.token_to_id(content) != int(index):
            raise ValueError(f"{config_path}: added token {content!r} should have id {index}, "
                             f"got {tokenizer.token_to_id(content)} after adding it")


def _read_chat_template(folder: pathlib.Path, config: Mapping[str, Any]) -> str:
    """chat_template.jinja if present (it wins, as in transformers), else tokenizer_config.json's chat_template."""
    jinja_path = folder / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # legacy multi-template form: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise ValueError(f"no chat template in {folder}: neither {CHAT_TEMPLATE_FILE} nor a 'chat_template' string "
                         f"in {folder / TOKENIZER_CONFIG_FILE}")
    return template
