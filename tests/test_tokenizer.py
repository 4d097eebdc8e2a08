"""PromptTokenizer against transformers' Qwen2Tokenizer (AutoTokenizer) loading the same saved folder."""

import json
import random

import jinja2
import numpy as np
import pytest
from transformers import AutoTokenizer

from klein_jax.chat_template import packaged_chat_template
from klein_jax.demo_tokenizer import build_demo_tokenizer, demo_prompt_tokenizer, save_tokenizer_folder
from klein_jax.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, PromptTokenizer

_PIECES = (
    "a", "photo", "of", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "cat", "Cat", "CAT", "it's", "IT'S",
    "we'll", "they've", "I'm", "you'd", "don't", "'re", "'S", "0", "7", "42", "3.14", "1920x1080", "12345678901",
    "café", "cafe\u0301", "naïve", "Ångström", "A\u030a", "ﬁ", "Ｆｕｌｌ", "straße", "Привет", "мир", "γειά",
    "你好", "世界", "熊猫", "日本語のテキスト", "한국어", "مرحبا", "שלום", "हिन्दी", "ไทย",
    "🦊", "🎉", "👩‍🚀", "🏳️‍🌈", "👍🏽", "🇯🇵", "⌚️", "\u200b", "\u00a0", "\u3000",
    "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>", "</think>", "<|im_", "<think", "|>", "<>",
    "!", "?!", "...", "—", "–", "«", "»", "\"", "'", "`", "$", "%", "#", "@", "&&", "->", "=>", "{{", "}}", "{%", "%}",
)


def _varied_strings(n: int, seed: int = 0) -> list[str]:
    """Deterministic mixes of ascii, unicode, CJK, emoji, whitespace runs, digits, contractions, special-token text."""
    rng = random.Random(seed)
    out = ["", " ", "\n", "a", "Hello, world!", "<|im_end|>", "<think>\n\n</think>\n\n", "x" * 300]
    while len(out) < n:
        k = rng.randint(1, 40)
        out.append("".join(rng.choice(_PIECES) for _ in range(k)))
    return out


STRINGS = _varied_strings(300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The demo tokenizer saved twice: template inline in tokenizer_config.json, and in chat_template.jinja."""
    tokenizer = build_demo_tokenizer()
    inline = save_tokenizer_folder(tmp_path_factory.mktemp("inline"), tokenizer)
    jinja = save_tokenizer_folder(tmp_path_factory.mktemp("jinja"), tokenizer, chat_template_file=True)
    return {"inline": inline, "jinja": jinja}


@pytest.fixture(scope="module", params=["inline", "jinja"])
def pair(request, folders):
    folder = folders[request.param]
    return PromptTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)


def _reference_render(hf, prompt):
    return hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)


def test_saved_layout(folders):
    inline, jinja = folders["inline"], folders["jinja"]
    config = json.loads((inline / TOKENIZER_CONFIG_FILE).read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["pad_token"] == "<|endoftext|>" and config["eos_token"] == "<|im_end|>"
    assert config["chat_template"] == packaged_chat_template()
    assert not (inline / CHAT_TEMPLATE_FILE).exists()
    assert "chat_template" not in json.loads((jinja / TOKENIZER_CONFIG_FILE).read_text())
    assert (jinja / CHAT_TEMPLATE_FILE).read_text() == packaged_chat_template()


def test_demo_tokenizer_ids_and_determinism():
    tokenizer = build_demo_tokenizer()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    assert max(vocab.values()) == 1023 and len(vocab) == 1024
    assert [vocab[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")] == list(
        range(1019, 1024))
    assert build_demo_tokenizer().to_str() == tokenizer.to_str()
    assert max(build_demo_tokenizer(512).get_vocab(with_added_tokens=True).values()) == 511
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_demo_tokenizer(100)


def test_render_is_the_qwen3_generation_prompt():
    tokenizer = demo_prompt_tokenizer()
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tokenizer.render("a red fox") == "<|im_start|>user\na red fox" + suffix
    assert tokenizer.render("") == "<|im_start|>user\n" + suffix
    with pytest.raises(TypeError, match="str"):
        tokenizer.render(None)


def test_render_matches_apply_chat_template(pair):
    ours, hf = pair
    for s in STRINGS:
        assert ours.render(s) == _reference_render(hf, s), repr(s)


def test_raw_ids_match_transformers(pair):
    ours, hf = pair
    for s in STRINGS:
        assert ours.tokenizer.encode(s).ids == hf(s)["input_ids"], repr(s)


@pytest.mark.parametrize("max_length", [512, 24])
def test_encode_matches_pipeline_tokenization(pair, max_length):
    ours, hf = pair
    prompts = STRINGS[:100] + ["a long prompt " * 200]
    input_ids, attention_mask = ours.encode(prompts, max_length=max_length)
    assert input_ids.dtype == np.int32 and attention_mask.dtype == np.int32
    assert input_ids.shape == attention_mask.shape == (len(prompts), max_length)
    for i, prompt in enumerate(prompts):  # as Flux2KleinPipeline._get_qwen3_prompt_embeds, one prompt at a time
        want = hf(_reference_render(hf, prompt), padding="max_length", truncation=True, max_length=max_length)
        assert input_ids[i].tolist() == want["input_ids"], repr(prompt)
        assert attention_mask[i].tolist() == want["attention_mask"], repr(prompt)
    # Right padding with the pad id; the 200-repeat prompt is cut at the end (no pad, mask all ones).
    n = int(attention_mask[0].sum())
    assert (input_ids[0, n:] == 1019).all() and (attention_mask[0, n:] == 0).all() and attention_mask[0, :n].all()
    assert attention_mask[-1].all() and input_ids[-1, 0] == 1020


def test_encode_single_string_and_bad_length():
    tokenizer = demo_prompt_tokenizer()
    input_ids, attention_mask = tokenizer.encode("a cat")
    assert input_ids.shape == (1, 512)
    # <|im_start|> user \n a cat <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n
    assert input_ids[0, 0] == 1020 and int(attention_mask.sum()) == len(tokenizer.tokenizer.encode(
        tokenizer.render("a cat")).ids)
    with pytest.raises(ValueError, match="max_length=0"):
        tokenizer.encode("a", max_length=0)


def test_demo_equals_saved_folder(folders):
    demo, loaded = demo_prompt_tokenizer(), PromptTokenizer.from_folder(folders["inline"])
    np.testing.assert_array_equal(demo.encode(STRINGS[:20])[0], loaded.encode(STRINGS[:20])[0])


def test_template_environment_matches_transformers(tmp_path):
    """tojson (no HTML escaping), namespace, loop controls, trim/lstrip blocks and special-token variables."""
    template = (
        "{%- set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "  {%- set ns.n = ns.n + 1 %}\n"
        "  {{ m | tojson }}|{{ m.content | tojson(indent=2) }}\n"
        "{% endfor %}\n"
        "{{ ns.n }}{{ eos_token }}{{ pad_token }}{% if add_generation_prompt %}GEN{% endif %}"
        "{% if enable_thinking is defined and enable_thinking is false %}NOTHINK{% endif %}"
        "{% if messages | length > 5 %}{{ raise_exception('too many') }}{% endif %}"
        "{% generation %}[{{ messages[0].role }}]{% endgeneration %}"
    )
    folder = save_tokenizer_folder(tmp_path, build_demo_tokenizer(), chat_template=template)
    ours, hf = PromptTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    for s in ["<b>&'\"</b>", "ü 日本 🦊", "line\nbreak"]:
        assert ours.render(s) == _reference_render(hf, s)
    assert ours.render("<b>") == '  {"role": "user", "content": "<b>"}|"<b>"\n1<|im_end|><|endoftext|>GENNOTHINK[user]'


def test_template_errors_surface(tmp_path):
    folder = save_tokenizer_folder(tmp_path, build_demo_tokenizer(),
                                   chat_template="{{ raise_exception('no ' + messages[0].content) }}")
    with pytest.raises(jinja2.TemplateError, match="no way"):
        PromptTokenizer.from_folder(folder).render("way")


@pytest.fixture
def saved(tmp_path):
    return save_tokenizer_folder(tmp_path, build_demo_tokenizer())


def test_missing_tokenizer_json(saved):
    (saved / TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=str(saved / TOKENIZER_FILE)):
        PromptTokenizer.from_folder(saved)


@pytest.mark.parametrize("text", ['{"model": {"type": "BPE", "vocab": ', '{"model": 3}', "[]",
                                  '{"model": {"type": "WordLevel", "vocab": {}}}'])
def test_malformed_tokenizer_json(saved, text):
    (saved / TOKENIZER_FILE).write_text(text)
    with pytest.raises(ValueError, match=str(saved / TOKENIZER_FILE)):
        PromptTokenizer.from_folder(saved)


def test_qwen2_pieces_override_the_file_as_transformers_does(saved):
    """transformers 5 takes Qwen2Tokenizer's normaliser, pre-tokenizer and BPE options, not tokenizer.json's."""
    data = json.loads((saved / TOKENIZER_FILE).read_text())
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Whitespace"}
    data["model"]["ignore_merges"] = True
    (saved / TOKENIZER_FILE).write_text(json.dumps(data))
    ours, hf = PromptTokenizer.from_folder(saved), AutoTokenizer.from_pretrained(saved)
    for s in STRINGS[:100] + ["cafe\u0301 café", "a  b\n\nc"]:
        assert ours.tokenizer.encode(s).ids == hf(s)["input_ids"], repr(s)


def test_missing_tokenizer_config(saved):
    (saved / TOKENIZER_CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=str(saved / TOKENIZER_CONFIG_FILE)):
        PromptTokenizer.from_folder(saved)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"added_tokens_decoder": 3, "chat_template": "x"}'])
def test_malformed_tokenizer_config(saved, text):
    (saved / TOKENIZER_CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=str(saved / TOKENIZER_CONFIG_FILE)):
        PromptTokenizer.from_folder(saved)


def test_missing_chat_template(saved):
    config = json.loads((saved / TOKENIZER_CONFIG_FILE).read_text())
    del config["chat_template"]
    (saved / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template.*chat_template.jinja"):
        PromptTokenizer.from_folder(saved)


def test_chat_template_file_wins_over_config(saved):
    (saved / CHAT_TEMPLATE_FILE).write_text("FILE{{ messages[0].content }}")
    assert PromptTokenizer.from_folder(saved).render("x") == "FILEx"
    assert AutoTokenizer.from_pretrained(saved).apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False) == "FILEx"


def test_left_sides_from_config_match_transformers(saved):
    config = json.loads((saved / TOKENIZER_CONFIG_FILE).read_text())
    config.update(padding_side="left", truncation_side="left")
    (saved / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    ours, hf = PromptTokenizer.from_folder(saved), AutoTokenizer.from_pretrained(saved)
    input_ids, attention_mask = ours.encode(["a cat", "a long prompt " * 30], max_length=32)
    for i, prompt in enumerate(["a cat", "a long prompt " * 30]):
        want = hf(_reference_render(hf, prompt), padding="max_length", truncation=True, max_length=32)
        assert input_ids[i].tolist() == want["input_ids"] and attention_mask[i].tolist() == want["attention_mask"]
    assert attention_mask[0, 0] == 0 and attention_mask[0, -1] == 1
    config["padding_side"] = "middle"
    (saved / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer_config.json: padding_side='middle'"):
        PromptTokenizer.from_folder(saved)


def test_bad_pad_token(saved):
    config = json.loads((saved / TOKENIZER_CONFIG_FILE).read_text())
    config["pad_token"] = "<pad>"
    (saved / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'<pad>'"):
        PromptTokenizer.from_folder(saved)
