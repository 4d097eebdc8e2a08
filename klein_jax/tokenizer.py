"""Prompt tokenizer: the Qwen3 chat template + Qwen2 byte-level BPE, as Flux2KleinPipeline._get_qwen3_prompt_embeds.

The BPE runs in the HF `tokenizers` library (framework-free, Rust). The chat template is rendered with jinja2 the way
transformers' `apply_chat_template` does (utils/chat_template_utils.py: sandboxed environment, trim_blocks,
lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`). `build_demo_tokenizer` / `save_tokenizer_folder` make a
small Qwen2-style tokenizer in memory and write it in the on-disk layout transformers loads (tokenizer/ of a pipeline).
"""

from __future__ import annotations

import datetime
import importlib.resources
import json
import os
import pathlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the template here; it wins over the config's
MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline max_sequence_length

# transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD_TOKEN = "<|endoftext|>"  # Qwen2Tokenizer's pad_token default and the Qwen3 checkpoints' pad
# Added tokens of the demo tokenizer, in Qwen3's order, with Qwen3's `special` flags (tokenizer_config.json of
# Qwen/Qwen3-4B: <think> and </think> are added tokens that are not special).
DEMO_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
)
# Named special tokens of Qwen/Qwen3-4B tokenizer_config.json (bos and unk are null there).
DEMO_SPECIAL_TOKENS: dict[str, str | None] = {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": None,
                                              "pad_token": PAD_TOKEN}
QWEN3_MODEL_MAX_LENGTH = 131072  # Qwen/Qwen3-4B tokenizer_config.json
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
# The BPE options Qwen2Tokenizer.__init__ passes (transformers 5), which override those in tokenizer.json.
_QWEN2_BPE_OPTIONS = {"dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Training text of the demo tokenizer: a little of everything prompts contain, so that the merges are not trivial.
_DEMO_CORPUS = """\
A photograph of a red fox sitting in the snow at sunrise, soft golden light, shallow depth of field.
An oil painting of a lighthouse on a rocky coast during a storm; waves crash against the rocks.
A watercolor illustration of a small cottage in the forest, with smoke rising from the chimney.
Close-up portrait of an old man with a white beard, wearing a wool hat, 85mm lens, f/1.8, bokeh.
A futuristic city skyline at night with neon signs, flying cars and rain-soaked streets.
The cat's toy isn't under the table; it's on the sofa. We'll find it. They've looked, I'm sure, you'd agree.
Minimalist logo design: the letters "K" and "J" in a circle, flat vector, blue and orange, white background.
A bowl of ramen with a soft-boiled egg, green onions and chili oil, top-down view, studio lighting.
Product shot of a wristwatch on a marble table, reflections, 4k, highly detailed, sharp focus.
Isometric 3D render of a tiny island with palm trees, a wooden dock and a sailboat, pastel colors.
Text on the sign reads: "Open 24/7 - Coffee $3.50, Tea $2.25". Phone: +1 (555) 012-3456.
Une photo d'un café parisien en automne, des feuilles dorées sur le trottoir, ambiance chaleureuse.
Ein Gemälde einer Berglandschaft mit einem klaren See, Schnee auf den Gipfeln, früher Morgen.
Una ilustración de un dragón volando sobre un castillo medieval al atardecer, colores vibrantes.
Фотография зимнего леса с заснеженными елями и тропинкой, мягкий утренний свет.
一只在竹林里吃竹子的大熊猫，高清摄影，柔和的自然光。
富士山と桜の風景、春の朝、青い空、日本画のスタイル。
한옥 마을의 골목길, 가을 단풍, 따뜻한 오후 햇살.
صورة لمدينة قديمة في الصحراء عند غروب الشمس.
Emoji party: 🎉🦊🌅🍜 ⌚️ 👩‍🚀 🏳️‍🌈 — done!
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 1e-6 50% 1920x1080 16:9.
Code: def render(prompt): return f"<{prompt}>"  # comment
	Tabs	and  double  spaces,   triple   spaces.
Line one
Line two\r
Line three


End of the corpus.
"""


def build_demo_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A small, deterministic Qwen2-style byte-level BPE with Qwen3's special tokens, every id < vocab_size."""
    num_added = len(DEMO_ADDED_TOKENS)
    if vocab_size < 256 + num_added:
        raise ValueError(f"vocab_size={vocab_size}: needs at least {256 + num_added} (256 bytes + added tokens)")
    tokenizer = Tokenizer(BPE(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False))
    _set_qwen2_pipeline(tokenizer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # as in Qwen's tokenizer.json: offsets only
    trainer = BpeTrainer(vocab_size=vocab_size - num_added, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator([_DEMO_CORPUS], trainer=trainer)
    # Qwen places its added tokens after the BPE vocabulary; non-special ones are not normalised either.
    for content, special in DEMO_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    top = max(tokenizer.get_vocab(with_added_tokens=True).values())
    assert top < vocab_size, f"demo tokenizer id {top} >= vocab_size {vocab_size}"
    return tokenizer


def _set_qwen2_pipeline(tokenizer: Tokenizer, *, add_prefix_space: bool = False) -> None:
    """Normaliser, pre-tokenizer and decoder exactly as transformers' Qwen2Tokenizer.__init__ builds them."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()


def packaged_chat_template() -> str:
    """The Qwen3 chat template shipped with klein_jax (assets/qwen3_chat_template.jinja)."""
    return importlib.resources.files("klein_jax").joinpath("assets/qwen3_chat_template.jinja").read_text("utf-8")


def save_tokenizer_folder(path: str | os.PathLike, tokenizer: Tokenizer, chat_template: str | None = None, *,
                          chat_template_file: bool = False,
                          special_tokens: Mapping[str, str | None] = DEMO_SPECIAL_TOKENS,
                          model_max_length: int = QWEN3_MODEL_MAX_LENGTH) -> pathlib.Path:
    """Writes tokenizer.json + tokenizer_config.json (+ chat_template.jinja) as transformers' Qwen2Tokenizer loads them.

    Args:
      chat_template: jinja source; None writes the packaged Qwen3 template.
      chat_template_file: write the template to chat_template.jinja (transformers 5 `save_pretrained`) instead of
        inline in tokenizer_config.json (the published Qwen3 checkpoints).
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chat_template = packaged_chat_template() if chat_template is None else chat_template
    tokenizer.save(str(path / TOKENIZER_FILE))
    added = tokenizer.get_added_tokens_decoder()
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())
        },
        # Qwen3 lists its special added tokens here except the pad/bos/unk one (<|endoftext|>).
        "additional_special_tokens": [t.content for _, t in sorted(added.items()) if t.special and t.content not in
                                      {special_tokens.get(k) for k in ("pad_token", "bos_token", "unk_token")}],
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        **special_tokens,
    }
    if chat_template_file:
        (path / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    else:
        config["chat_template"] = chat_template
    with open(path / TOKENIZER_CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(config.items())), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks assistant spans with it)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace() that refuses underscore-prefixed attributes, as transformers' TemplateNamespace."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _TemplateDict:
    """`dict(...)` inside templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's tojson, which would HTML-escape the text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a chat template in the environment transformers' apply_chat_template uses."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


class PromptTokenizer:
    """Prompt -> (input_ids, attention_mask) exactly as Flux2KleinPipeline._get_qwen3_prompt_embeds tokenizes."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, *,
                 special_tokens: Mapping[str, str | None] = DEMO_SPECIAL_TOKENS, padding_side: str = "right",
                 truncation_side: str = "right"):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name}={side!r} is not one of 'left', 'right'")
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
    def demo(cls, vocab_size: int = 1024) -> "PromptTokenizer":
        """The demo model's tokenizer: build_demo_tokenizer + the packaged Qwen3 chat template, no files."""
        return cls(build_demo_tokenizer(vocab_size), packaged_chat_template())

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
        _set_qwen2_pipeline(tokenizer, add_prefix_space=bool(config.get("add_prefix_space") or False))
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
