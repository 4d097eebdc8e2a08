"""Flux2Transformer against diffusers Flux2Transformer2DModel, plus hand-computed RoPE and timestep values."""

import copy
import dataclasses
import math

import diffusers
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import assert_close
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
from flax import nnx

from klein_jax.loading.keymaps.transformer import transformer_rules
from klein_jax.loading import WeightMappingError, expected_params, fill_module, load_component
from klein_jax.loading.safetensors import ShardedCheckpoint
from klein_jax.configs import KLEIN_4B, KLEIN_9B, TransformerConfig
from klein_jax.models.rope import apply_rope, rope_tables
from klein_jax.models.transformer import Flux2Transformer, timestep_embedding, timestep_frequencies

# Three tiny configs: different depths, head counts, head dims, rope axes, mlp ratios, in/out channels.
CONFIG_A = TransformerConfig(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
                             axes_dims_rope=(4, 4, 4, 4))
CONFIG_B = TransformerConfig(in_channels=8, out_channels=12, num_layers=2, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=3, joint_attention_dim=40, timestep_guidance_channels=64,
                             mlp_ratio=2.0, axes_dims_rope=(2, 6, 4, 4))
CONFIG_C = TransformerConfig(in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=32,
                             num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256,
                             axes_dims_rope=(8, 8, 8, 8))

# name -> (config, text tokens T, image grids (t, h, w): the target first, then reference images)
CASES = {
    "a_T7": (CONFIG_A, 7, [(0, 3, 5)]),
    "b_T13_refs": (CONFIG_B, 13, [(0, 3, 5), (10, 2, 3), (20, 2, 2)]),
    "c_T13_refs": (CONFIG_C, 13, [(0, 3, 5), (10, 3, 2)]),
}

_forward = nnx.jit(lambda model, *inputs: model(*inputs))


def _grid_ids(t: int, h: int, w: int) -> np.ndarray:
    """(h*w, 4) ids (t, r, c, 0), row-major, as diffusers' _prepare_latent_ids / _prepare_image_ids."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([np.full(h * w, t), r.ravel(), c.ravel(), np.zeros(h * w, np.int64)], axis=-1)


def _inputs(config: TransformerConfig, T: int, grids, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    img_ids = np.concatenate([_grid_ids(*g) for g in grids])
    L = len(img_ids)
    return {
        "hidden_states": rng.standard_normal((2, L, config.in_channels)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((2, T, config.joint_attention_dim)).astype(np.float32),
        "timestep": np.array([0.73, 0.11], np.float32),
        "img_ids": img_ids.astype(np.int64),
        "txt_ids": np.stack([np.zeros(T), np.zeros(T), np.zeros(T), np.arange(T)], -1).astype(np.int64),
    }


def _reference(config: TransformerConfig, seed: int) -> diffusers.Flux2Transformer2DModel:
    """diffusers model with random weights; norm weights randomised too, so no parameter is trivially 1 or 0."""
    torch.manual_seed(seed)
    model = diffusers.Flux2Transformer2DModel(**config.to_dict()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _run_reference(model, inputs) -> np.ndarray:
    dtype = next(model.parameters()).dtype
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(hidden_states=t["hidden_states"].to(dtype), encoder_hidden_states=t["encoder_hidden_states"].to(dtype),
                    timestep=t["timestep"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=None)
    return out.sample.float().numpy()


def _run_ours(model, inputs) -> np.ndarray:
    names = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")
    return np.asarray(_forward(model, *(jnp.asarray(inputs[k]) for k in names)), dtype=np.float32)


def _load(folder, config, dtype=jnp.float32):
    return load_component("transformer", config, ShardedCheckpoint(folder), dtype)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config, T, grids = CASES[request.param]
    reference = _reference(config, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)  # the real layout: config.json + diffusion_pytorch_model.safetensors
    inputs = _inputs(config, T, grids)
    return {"name": request.param, "config": config, "folder": folder, "reference": reference,
            "inputs": inputs, "want": _run_reference(reference, inputs), "ours": _load(folder, config)}


def test_matches_diffusers_float32(case):
    got = _run_ours(case["ours"], case["inputs"])
    err = assert_close(got, case["want"], rel=1e-5, name=case["name"])
    print(f"{case['name']}: float32 max rel err {err:.2e}")


BF16_CASES = ["b_T13_refs"]  # one case: a bf16 compile takes ~10 s on this CPU


@pytest.fixture(scope="module")
def bf16_case(case):
    """Our model and diffusers' in bfloat16 (params and compute), loaded from the same checkpoint."""
    return dict(case, ours_bf16=_load(case["folder"], case["config"], dtype=jnp.bfloat16),
                reference_bf16=copy.deepcopy(case["reference"]).to(torch.bfloat16))


@pytest.mark.parametrize("case", BF16_CASES, indirect=True)
def test_bfloat16_close_to_float32(bf16_case):
    """Ours in bf16 vs ours in float32, at sigmas whose x1000 is exact in bf16, so only bf16 arithmetic differs."""
    inputs = dict(bf16_case["inputs"], timestep=np.array([0.5, 0.125], np.float32))
    want = _run_ours(bf16_case["ours"], inputs)
    err_theirs = assert_close(_run_reference(bf16_case["reference_bf16"], inputs), want, rel=1.0, name="diffusers")
    err = assert_close(_run_ours(bf16_case["ours_bf16"], inputs), want, rel=1.5e-2, name=bf16_case["name"])
    print(f"{bf16_case['name']}: bf16 vs float32 max rel err: ours {err:.2e}, diffusers' own {err_theirs:.2e}")
    assert err <= 2 * err_theirs + 2e-3, f"our bf16 error {err:.2e} vs diffusers' {err_theirs:.2e}"


@pytest.mark.parametrize("case", BF16_CASES, indirect=True)
def test_bfloat16_follows_diffusers_bfloat16(bf16_case):
    """At sigma 0.73 diffusers' bf16 embeds t = 732, not 730.47: ours must round the same way."""
    inputs = bf16_case["inputs"]
    theirs = _run_reference(bf16_case["reference_bf16"], inputs)
    err_f32 = assert_close(bf16_case["want"], theirs, rel=1.0, name="float32 vs diffusers bf16")
    assert err_f32 > 5e-2, "sigmas chosen so that bf16 timestep rounding changes the output"
    err = assert_close(_run_ours(bf16_case["ours_bf16"], inputs), theirs, rel=1.5e-2, name=bf16_case["name"])
    print(f"{bf16_case['name']}: ours bf16 vs diffusers bf16 max rel err {err:.2e} (float32 vs it: {err_f32:.2e})")


def test_every_rule_is_used(case):
    keys = list(ShardedCheckpoint(case["folder"]))
    for rule in transformer_rules(case["config"]):
        assert any(rule._regex.fullmatch(k) for k in keys), f"rule {rule.source} matches no diffusers key"


@pytest.fixture(scope="module")
def tiny_tensors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors")
    _reference(CONFIG_A, seed=0).save_pretrained(folder)
    return dict(ShardedCheckpoint(folder))


def _load_tensors(tensors):
    return load_component("transformer", CONFIG_A, tensors, jnp.float32)


def test_wrong_shape_names_key_and_expected_shape(tiny_tensors):
    tensors = dict(tiny_tensors, **{"transformer_blocks.0.attn.to_q.weight": np.zeros((32, 33), np.float32)})
    with pytest.raises(WeightMappingError, match=r"shape mismatches") as e:
        _load_tensors(tensors)
    assert "transformer_blocks.0.attn.to_q.weight" in str(e.value)
    assert "model expects [32, 32] at transformer_blocks.0.attn.to_q.kernel" in str(e.value)


def test_missing_weight_names_path_and_shape(tiny_tensors):
    tensors = {k: v for k, v in tiny_tensors.items() if k != "single_transformer_blocks.1.attn.norm_k.weight"}
    with pytest.raises(WeightMappingError, match=r"missing weights \(1\)") as e:
        _load_tensors(tensors)
    assert "single_transformer_blocks.1.attn.norm_k.scale (shape [16])" in str(e.value)


def test_extra_keys_listed_as_unexpected(tiny_tensors):
    extra = {"transformer_blocks.0.attn.to_q.bias": np.zeros(32, np.float32),
             "transformer_blocks.1.attn.to_q.weight": np.zeros((32, 32), np.float32)}  # CONFIG_A has one block
    with pytest.raises(WeightMappingError, match=r"unexpected keys \(2\)") as e:
        _load_tensors(dict(tiny_tensors, **extra))
    assert "transformer_blocks.0.attn.to_q.bias" in str(e.value)
    assert "transformer_blocks.1.attn.to_q.weight (-> transformer_blocks.1.attn.to_q.kernel" in str(e.value)


@pytest.mark.parametrize("config, params", [(KLEIN_4B, 3_875_544_576), (KLEIN_9B, 9_078_581_248)])
def test_parameter_count_of_real_configs(config, params):
    model = nnx.eval_shape(lambda: Flux2Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                    rngs=nnx.Rngs(0)))
    _, state = nnx.split(model)
    assert sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(state)) == params  # klein.md §1.2


def test_rope_tables_hand_values():
    # axes (2, 4), theta 100: axis 0 has omega [1]; axis 1 has omega [1, 100 ** (-2/4)] = [1, 0.1]
    cos, sin = rope_tables(jnp.array([[3, 2]]), (2, 4), 100.0)
    np.testing.assert_allclose(np.asarray(cos), [[math.cos(3), math.cos(2), math.cos(0.2)]], atol=1e-7)
    np.testing.assert_allclose(np.asarray(sin), [[math.sin(3), math.sin(2), math.sin(0.2)]], atol=1e-7)


def test_apply_rope_rotates_interleaved_pairs():
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)  # (B, S, H, Dh)
    angles = np.array([[2.0, 0.2]])
    out = np.asarray(apply_rope(x, jnp.cos(angles), jnp.sin(angles))).ravel()
    c0, s0, c1, s1 = math.cos(2.0), math.sin(2.0), math.cos(0.2), math.sin(0.2)
    np.testing.assert_allclose(out, [1 * c0 - 2 * s0, 2 * c0 + 1 * s0, 3 * c1 - 4 * s1, 4 * c1 + 3 * s1], atol=1e-6)


def test_rope_tables_match_float64_angles():
    """diffusers computes angles in float64; our float32 tables agree to ~2 ulp for positions up to 4095."""
    pos = np.arange(4096)
    ids = np.stack([pos, pos[::-1], pos // 7, pos % 512], axis=-1)
    cos, sin = rope_tables(jnp.asarray(ids), (32, 32, 32, 32), 2000.0)
    want = Flux2PosEmbed(theta=2000, axes_dim=[32, 32, 32, 32])(torch.from_numpy(ids))
    err_cos = np.abs(np.asarray(cos) - want[0].numpy()[:, ::2]).max()  # diffusers repeat-interleaves each pair
    err_sin = np.abs(np.asarray(sin) - want[1].numpy()[:, ::2]).max()
    print(f"rope tables vs diffusers (float64 angles): max abs err cos {err_cos:.1e}, sin {err_sin:.1e}")
    assert max(err_cos, err_sin) <= 5e-7


def test_timestep_embedding_hand_values():
    # dim 4: half 2, frequencies exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01]; cos first
    emb = np.asarray(timestep_embedding(jnp.array([0.0, 500.0]), 4))
    want = [[1, 1, 0, 0], [math.cos(500), math.cos(5), math.sin(500), math.sin(5)]]
    np.testing.assert_allclose(emb, want, atol=2e-6)


def test_timestep_embedding_matches_diffusers():
    """Equal to diffusers except where torch's float32 exp is 1 ulp off (ours is correctly rounded). How many of the
    128 frequencies torch rounds differently depends on the CPU's vector unit (2 on one machine, 3 on another)."""
    t = np.array([0.0, 1.5, 110.0, 732.0, 968.0, 999.9], np.float32)
    want = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    got = np.asarray(timestep_embedding(jnp.asarray(t), 256))
    exponent = -math.log(10000) * torch.arange(128, dtype=torch.float32) / 128  # diffusers' float32 formula
    torch_freqs, freqs = torch.exp(exponent).numpy(), timestep_frequencies(256)
    off = np.nonzero(torch_freqs != freqs)[0]
    assert len(off) <= 8 and np.all(np.abs(torch_freqs[off] - freqs[off]) <= np.spacing(freqs[off]))
    np.testing.assert_array_equal(freqs, np.exp(exponent.numpy().astype(np.float64)).astype(np.float32))
    same = np.setdiff1d(np.arange(256), np.concatenate([off, off + 128]))
    np.testing.assert_allclose(got[:, same], want[:, same], atol=2e-7)
    args = (t[:, None] * freqs[None]).astype(np.float64)  # float32 arguments, then exact cos/sin
    np.testing.assert_allclose(got, np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-7)


def test_bfloat16_timestep_is_scaled_in_bfloat16():
    """sigma -> bf16 -> x1000 in bf16 (diffusers): 0.96738 embeds as 968, not BFL's 968.75 (klein.md §8.3)."""
    config = dataclasses.replace(CONFIG_A, num_layers=0, num_single_layers=0, timestep_guidance_channels=8)
    # eval_shape + numpy weights: eager random init compiles one program per shape (~20 s on a busy CPU)
    model = nnx.eval_shape(lambda: Flux2Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                    rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    model = fill_module(model, {path: rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
                                for path, (shape, _) in expected_params(model).items()})
    sigma = jnp.array([0.96738], jnp.float32)
    assert float((sigma.astype(jnp.bfloat16) * 1000)[0]) == 968.0
    got = model.embed_timestep(sigma)
    want = model.time_guidance_embed(jnp.array([968.0], jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert got.dtype == jnp.bfloat16
