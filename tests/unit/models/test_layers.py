"""Decoder-layer outputs captured by forward hooks are HF's hidden_states[layer + 1]; dropout switched off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ray_unlearn.models.layers import capture_layer_outputs, decoder_layers, disable_dropout, params_through_layer


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32)).eval()


def test_decoder_layers_in_order_also_inside_a_wrapper():
    model = _tiny()
    assert decoder_layers(model) == list(model.model.layers)
    assert decoder_layers(SimpleNamespace(module=model)) == list(model.model.layers)  # DDP / DeepSpeed engine


def test_captured_outputs_are_hf_hidden_states_and_hooks_are_removed():
    model = _tiny()
    ids = torch.tensor([[1, 5, 7, 9], [2, 4, 6, 0]])
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0, ...]
        hooks = [dict(layer._forward_hooks) for layer in model.model.layers]  # transformers 5 installs its own
        with capture_layer_outputs(model, [0, 1]) as hidden:
            logits = model(input_ids=ids).logits
    assert set(hidden) == {0, 1}
    torch.testing.assert_close(hidden[0], states[1], rtol=0, atol=0)
    torch.testing.assert_close(hidden[1], states[2], rtol=0, atol=0)
    assert [dict(layer._forward_hooks) for layer in model.model.layers] == hooks
    with capture_layer_outputs(model, []) as none:
        with torch.no_grad():
            again = model(input_ids=ids).logits
    assert none == {} and torch.equal(again, logits)


def test_captured_outputs_carry_gradients():
    model = _tiny().train()
    with capture_layer_outputs(model, [0]) as hidden:
        model(input_ids=torch.tensor([[1, 2, 3]]))
    hidden[0].pow(2).sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[2].mlp.down_proj.weight.grad is None  # after the layer: no gradient


def test_decoder_layers_found_after_fsdp2_swaps_their_class():
    model = _tiny()
    layer = model.model.layers[1]
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})  # what fully_shard does
    assert decoder_layers(model) == list(model.model.layers)


@pytest.mark.parametrize("tied", [True, False])
def test_params_through_layer_are_the_embeddings_and_the_layers_up_to_it(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=tied))
    names = params_through_layer(model, 1)
    expected = ["model.embed_tokens.weight"] + [n for n, _ in model.named_parameters()
                                                if n.startswith(("model.layers.0.", "model.layers.1."))]
    assert names == expected  # not layer 2, model.norm or an untied lm_head


def test_disable_dropout_makes_training_mode_deterministic():
    """GPT-2 keeps its rates in nn.Dropout modules, Llama-style attention in a float `attention_dropout`."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, attention_dropout=0.5))
    ids = torch.tensor([[1, 5, 7, 9]])
    for model in (gpt2, llama):
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout draws new masks
        disable_dropout(model)
        assert torch.equal(model(ids).logits, model(ids).logits)
        assert torch.equal(model(ids).logits, model.eval()(ids).logits)
    assert gpt2.config.resid_pdrop == 0.1 and llama.config.attention_dropout == 0.5  # what a save writes
