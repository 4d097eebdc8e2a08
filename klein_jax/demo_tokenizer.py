"""The demo tokenizer: a small, deterministic Qwen2-style byte-level BPE with Qwen3's special tokens, built in memory,
and `save_tokenizer_folder`, which writes a tokenizer in the on-disk layout transformers loads (tokenizer/ of a
pipeline). Used by the demo model, the diffusers-folder export and the tests.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Tokenizer, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from klein_jax.chat_template import packaged_chat_template
from klein_jax.tokenizer import (
    CHAT_TEMPLATE_FILE,
    PAD_TOKEN,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    PromptTokenizer,
    set_qwen2_pipeline,
)

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
    set_qwen2_pipeline(tokenizer)
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


def demo_prompt_tokenizer(vocab_size: int = 1024) -> PromptTokenizer:
    """The demo model's tokenizer: build_demo_tokenizer + the packaged Qwen3 chat template, no files."""
    return PromptTokenizer(build_demo_tokenizer(vocab_size), packaged_chat_template(), special_tokens=DEMO_SPECIAL_TOKENS)


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
