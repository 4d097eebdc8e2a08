"""Qwen3TextEncoder + PromptTokenizer against Flux2KleinPipeline.encode_prompt on a tiny random Qwen3ForCausalLM."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_close
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from flax import nnx

from klein_jax.loading.keymaps.text_encoder import text_encoder_rules
from klein_jax.loading import WeightMappingError, expected_params, load_component
from klein_jax.loading.keymap import map_weights
from klein_jax.loading.safetensors import ShardedCheckpoint
from klein_jax.configs import TINY_TEXT_ENCODER, TextEncoderConfig
from klein_jax.latents import text_ids
from klein_jax.models import cpu_attention
from klein_jax.models.text_encoder import Qwen3TextEncoder, apply_rope, attention_mask_4d, rotate_half, text_mask
from klein_jax.demo_tokenizer import build_demo_tokenizer, save_tokenizer_folder
from klein_jax.tokenizer import PromptTokenizer

NUM_LAYERS = 5
PROMPTS = [
    "",
    "A red fox in the snow at sunrise, soft light.",
    "Unicode: café naïve Ångström straße 日本語のテキスト 한국어 Привет мир",
    "Emoji 🦊🎉👩‍🚀🏳️‍🌈 and <think> tags </think> and <|im_end|> inside",
    "a very long prompt with many words, " * 60,  # > 512 tokens: cut at the end like the pipeline
]


def _qwen3_config(tie: bool) -> transformers.Qwen3Config:
    t = TINY_TEXT_ENCODER
    return transformers.Qwen3Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, max_position_embeddings=1024,
        tie_word_embeddings=tie, pad_token_id=1019,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from init (norm scales != 1, wide embeddings) so that every op shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


# Eager JAX compiles every op separately; one jitted program per shape keeps this file fast on 2 shared cores.
_forward = nnx.jit(lambda model, input_ids, attention_mask: model(input_ids, attention_mask))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny reference runs ~10x faster on one thread than on two contended ones; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _reference_hidden_states(ref, input_ids, attention_mask):
    with torch.no_grad():
        return ref(input_ids=torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(attention_mask).long(),
                   output_hidden_states=True, use_cache=False).hidden_states


@pytest.fixture(scope="module", params=[((1, 3, 4), True), ((0, 2, 5), False)], ids=["layers134", "layers025"])
def setup(request, tmp_path_factory):
    """Reference pipeline + our tokenizer and encoder loaded from the same saved folders, both run on PROMPTS."""
    out_layers, tie = request.param
    root = tmp_path_factory.mktemp("klein")
    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(_qwen3_config(tie)).eval()
    _randomize(ref, seed=1)
    ref.save_pretrained(root / "text_encoder")
    save_tokenizer_folder(root / "tokenizer", build_demo_tokenizer())
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=ref,
                              tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
                              transformer=None)
    with torch.no_grad():
        want_embeds, want_ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512,
                                                   text_encoder_out_layers=out_layers)
    config = TextEncoderConfig.from_json(root / "text_encoder" / "config.json", out_layers=out_layers)
    ours = load_component("text_encoder", config, ShardedCheckpoint(root / "text_encoder"), jnp.float32)
    tokenizer = PromptTokenizer.from_folder(root / "tokenizer")
    input_ids, attention_mask = tokenizer.encode(PROMPTS, max_length=512)
    return dict(ref=ref, ours=ours, config=config, out_layers=out_layers, tokenizer=tokenizer,
                input_ids=input_ids, attention_mask=attention_mask, want_embeds=want_embeds.numpy(),
                want_ids=want_ids.numpy(), got=np.asarray(_forward(ours, input_ids, attention_mask)))


def test_prompt_embeds_match_encode_prompt(setup):
    got, want = setup["got"], setup["want_embeds"]
    assert setup["attention_mask"][-1].all(), "the long prompt should fill all 512 tokens"
    assert got.shape == want.shape == (len(PROMPTS), 512, 3 * 32)
    # Every position, pads included: the DiT reads pad rows too.
    assert_close(got, want, rel=1e-5, name="prompt_embeds")
    assert setup["want_ids"].shape == (len(PROMPTS), 512, 4)
    for i in range(len(PROMPTS)):
        np.testing.assert_array_equal(text_ids(512), setup["want_ids"][i])


def test_layout_is_slot_major(setup):
    """Feature slot s * hidden + c holds hidden_states[out_layers[s]][..., c]."""
    hidden = _reference_hidden_states(setup["ref"], setup["input_ids"], setup["attention_mask"])
    for slot, k in enumerate(setup["out_layers"]):
        assert_close(setup["got"][..., slot * 32:(slot + 1) * 32], hidden[k].numpy(), rel=1e-5,
                     name=f"hidden_states[{k}]")


def test_any_mask_matches_transformers(setup):
    """Left padding and an all-zero row (queries that see no key get 0, as torch SDPA): same as transformers."""
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 1024, size=(3, 12)).astype(np.int32)
    attention_mask = np.ones((3, 12), np.int32)
    attention_mask[0, :4] = 0  # left padded
    attention_mask[1, 5:] = 0  # right padded
    attention_mask[2, :] = 0
    hidden = _reference_hidden_states(setup["ref"], input_ids, attention_mask)
    want = torch.cat([hidden[k] for k in setup["out_layers"]], dim=-1).numpy()
    assert_close(_forward(setup["ours"], input_ids, attention_mask), want, rel=1e-5)


def test_text_mask_knows_padding_at_the_end():
    def at_end(rows):
        return bool(text_mask(jnp.asarray(rows, jnp.int32)).padding_at_end)

    assert at_end([[1, 1, 0], [1, 1, 1]]) and at_end([[1, 0, 0]])
    assert not at_end([[1, 1, 0], [0, 1, 1]])  # one row left-padded
    assert not at_end([[1, 0, 1]]) and not at_end([[1, 1, 0], [0, 0, 0]])  # a hole; a row of no token
    mask = text_mask(jnp.asarray([[1, 1, 0], [0, 0, 0]], jnp.int32))
    np.testing.assert_array_equal(mask.lengths, [2, 0])
    np.testing.assert_array_equal(mask.has_key, [[1, 1, 1], [0, 0, 0]])


@pytest.mark.skipif(not cpu_attention.available(), reason=f"no kernel: {cpu_attention._load()}")
def test_fused_kernel_path_matches_transformers():
    """Head dim 16 (as the medium benchmark's; Qwen3-4B's is 128): float32 CPU attention runs the fused kernel as
    causal + lengths when every row's padding is at the end, and the dense mask otherwise; both equal transformers."""
    t = dataclasses.replace(TINY_TEXT_ENCODER, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, out_layers=(1, 2, 3))
    ref = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta}, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=1019)).eval()
    _randomize(ref, seed=3)
    ours = load_component("text_encoder", t, {k: v.numpy() for k, v in ref.state_dict().items()}, jnp.float32)
    assert {layer.self_attn.mask_attention for layer in ours.layers} == {"fused"}
    rng = np.random.default_rng(4)
    input_ids = rng.integers(0, 1000, size=(3, 160)).astype(np.int32)
    at_end = np.zeros((3, 160), np.int32)
    for row, length in enumerate((160, 97, 1)):  # full, padded past a 32-key tile and an 8-row block, one token
        at_end[row, :length] = 1
    left = at_end[:, ::-1].copy()
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))
    assert cpu_attention.TARGET in forward.lower(state, input_ids, at_end).as_text()
    want = {}
    for name, attention_mask in (("at end", at_end), ("left", left), ("none", np.ones_like(at_end))):
        hidden = _reference_hidden_states(ref, input_ids, attention_mask)
        want[name] = torch.cat([hidden[k] for k in t.out_layers], dim=-1).numpy()
        assert_close(forward(state, input_ids, attention_mask), want[name], rel=1e-5, name=name)
    # the padding matters (the pad rows' queries see only the tokens' keys)
    assert np.abs(want["none"][1:] - want["at end"][1:]).max() > 100 * 1e-5 * np.abs(want["at end"]).max()


@pytest.fixture(scope="module")
def bfloat16_pair(setup):
    """Our encoder and transformers' Qwen3ForCausalLM, both in bfloat16 with the same weights."""
    weights = {k: v.numpy() for k, v in setup["ref"].state_dict().items()}
    ours = load_component("text_encoder", setup["config"], weights, jnp.bfloat16)
    return ours, copy.deepcopy(setup["ref"]).bfloat16()


def test_bfloat16_runs_close_to_float32_reference(setup, bfloat16_pair):
    """bf16 params and compute (the pipeline's dtype): bf16 output, within bf16 noise of the fp32 reference.

    Measured on PROMPTS at 512 tokens (layers134): torch's own bf16 run deviates 1.1e-2 (max error / scale) from its
    fp32 run, ours 1.7e-2; mean errors 1.1e-3 and 1.6e-3.
    """
    ours = bfloat16_pair[0]
    input_ids, attention_mask = setup["input_ids"][1:4, :96], setup["attention_mask"][1:4, :96]  # bf16 is slow on CPU
    hidden = _reference_hidden_states(setup["ref"], input_ids, attention_mask)
    want = torch.cat([hidden[k] for k in setup["out_layers"]], dim=-1).numpy()
    got = _forward(ours, input_ids, attention_mask)
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, rel=5e-2, name="bf16 prompt_embeds")


def test_bfloat16_rms_norm_rounds_as_transformers(bfloat16_pair):
    """Qwen3RMSNorm in bf16 rounds the normalised value to bf16 *before* the weight multiply: bit-identical."""
    ours, ref = bfloat16_pair
    x = (3 * torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0))).bfloat16()
    with torch.no_grad():
        want = ref.model.layers[0].input_layernorm(x).float().numpy()
    got = nnx.jit(lambda norm, x: norm(x))(ours.layers[0].input_layernorm, jnp.asarray(x.float().numpy(), jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_bfloat16_matches_transformers_bfloat16(setup, bfloat16_pair):
    """bf16 against transformers' own bf16 run: mean abs error (mean |feature| 1.26 and 0.92).

    Measured on PROMPTS[1:4] at 96 tokens: 1.05e-2 (layers134) and 5.65e-3 (layers025) with the RMSNorm weight
    multiplied in fp32 (one rounding), 9.38e-3 and 5.10e-3 with transformers' order; the bounds sit between.
    """
    ours, ref = bfloat16_pair
    input_ids, attention_mask = setup["input_ids"][1:4, :96], setup["attention_mask"][1:4, :96]
    hidden = _reference_hidden_states(ref, input_ids, attention_mask)
    want = torch.cat([hidden[k] for k in setup["out_layers"]], dim=-1).float().numpy()
    got = np.asarray(_forward(ours, input_ids, attention_mask), np.float32)
    bound = {(1, 3, 4): 9.9e-3, (0, 2, 5): 5.4e-3}[setup["out_layers"]]
    assert np.abs(got - want).mean() <= bound


def test_only_needed_layers_are_built(setup):
    config, ours = setup["config"], setup["ours"]
    assert len(ours.layers) == max(setup["out_layers"])
    assert (ours.norm is not None) == (max(setup["out_layers"]) == NUM_LAYERS)
    assert config.num_hidden_layers == NUM_LAYERS and config.rope_theta == 10_000.0


def test_rules_drop_unused_and_reject_missing(setup):
    config = setup["config"]
    rules = text_encoder_rules(config)
    for i in range(NUM_LAYERS):
        key = f"model.layers.{i}.mlp.up_proj.weight"
        (rule,) = [r for r in rules if r._regex.fullmatch(key)]
        want = f"layers.{i}.mlp.up_proj.kernel" if i < config.num_layers_run else None
        assert (rule._regex.fullmatch(key).expand(rule.target) if rule.target else None) == want
    weights = {k: v.numpy() for k, v in setup["ref"].state_dict().items()}
    weights.pop("model.layers.0.self_attn.k_norm.weight")
    abstract = nnx.eval_shape(lambda: Qwen3TextEncoder(config, rngs=nnx.Rngs(0)))
    with pytest.raises(WeightMappingError, match=r"missing weights.*layers\.0\.self_attn\.k_norm\.scale"):
        map_weights(weights, rules, expected_params(abstract))


def test_rotate_half_and_rope_by_hand():
    x = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(rotate_half(x), [[-3.0, -4.0, 1.0, 2.0]])
    q = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)  # (B, T, H, Dh)
    cos = jnp.asarray([[0.5, 0.25, 0.5, 0.25]])
    sin = jnp.asarray([[0.1, 0.2, 0.1, 0.2]])
    # q*cos + rotate_half(q)*sin = [0.5-0.3, 0.5-0.8, 1.5+0.1, 1.0+0.4]
    np.testing.assert_allclose(apply_rope(q, cos, sin).reshape(-1), [0.2, -0.3, 1.6, 1.4], rtol=1e-6)


def test_attention_mask_4d_by_hand():
    mask = np.asarray(attention_mask_4d(jnp.asarray([[1, 1, 0]])))[0, 0]
    np.testing.assert_array_equal(mask, [[1, 0, 0], [1, 1, 0], [1, 1, 0]])  # the pad query sees the real keys


def test_bad_inputs_and_default_mask():
    encoder = nnx.eval_shape(lambda: Qwen3TextEncoder(TINY_TEXT_ENCODER, rngs=nnx.Rngs(0)))  # abstract: no init
    with pytest.raises(ValueError, match="attention_mask shape"):
        encoder(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        encoder(jnp.zeros((4,), jnp.int32))
    out = nnx.eval_shape(lambda m, ids: m(ids), encoder, jnp.zeros((2, 4), jnp.int32))
    assert out.shape == (2, 4, 96) and out.dtype == jnp.float32
