"""transformers Qwen3ForCausalLM tensor names -> klein_jax.models.text_encoder.Qwen3TextEncoder paths.

Our tree mirrors `model.*` without the prefix: Linear `weight` (out, in) -> `kernel` (in, out), RMSNorm `weight` ->
`scale`, the embedding table -> `embedding`. Tensors the encoder never uses are dropped on purpose: decoder layers
>= num_layers_run, `model.norm` (unless the last hidden state is read), `lm_head` (absent when tied, as in Qwen3-4B).
"""

from __future__ import annotations

from klein_jax.loading.keymap import KeyRule, linear, same
from klein_jax.configs import TextEncoderConfig

_LINEARS = r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:gate_proj|up_proj|down_proj)"
_NORMS = r"self_attn\.(?:q_norm|k_norm)|input_layernorm|post_attention_layernorm"


def _layer_index_below(n: int) -> str:
    """A regex group matching the decimal integers 0..n-1 (n >= 1)."""
    return "(" + "|".join(str(i) for i in range(n)) + ")"


def text_encoder_rules(config: TextEncoderConfig) -> tuple[KeyRule, ...]:
    """KeyRule table for a transformers Qwen3 `text_encoder/` folder (model-*.safetensors) of this config."""
    run = config.num_layers_run
    rules = [KeyRule(r"model\.embed_tokens\.weight", "embed_tokens.embedding", same)]
    if run > 0:
        kept = _layer_index_below(run)
        rules += [
            KeyRule(rf"model\.layers\.{kept}\.({_LINEARS})\.weight", r"layers.\1.\2.kernel", linear),
            KeyRule(rf"model\.layers\.{kept}\.({_NORMS})\.weight", r"layers.\1.\2.scale", same),
        ]
    dropped = "|".join(str(i) for i in range(run, config.num_hidden_layers))
    if dropped:
        rules.append(KeyRule(rf"model\.layers\.(?:{dropped})\..+", None))  # layers after the last one read
    # transformers returns hidden_states[num_hidden_layers] after the final norm; only then is it needed.
    rules.append(KeyRule(r"model\.norm\.weight", "norm.scale" if run == config.num_hidden_layers else None, same))
    rules.append(KeyRule(r"lm_head\.weight", None))
    return tuple(rules)
