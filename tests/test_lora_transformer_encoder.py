"""LoRA inside torch's nn.TransformerEncoder / nn.TransformerEncoderLayer, whose eval-mode fused
path reads the layers' weights itself (it would skip any adapter) and packs padded batches into
NestedTensors."""

import copy

import pytest
import torch
from torch import nn

import ftkernels as ftk
from ftkernels.nn._lora_common import fast_path_guard
from ftkernels.peft_compat import lora_modules


def encoder(n_layers=2, d=32, heads=4, seed=0, **kw):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, heads, 2 * d + 3, dropout=0.0, batch_first=True, **kw)
    nested = not kw.get("norm_first", False)  # (torch packs only post-norm stacks)
    return nn.Sequential(nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=nested)).double()


def randomize_adapters(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.copy_(torch.randn_like(p) * 0.3)


def padded_batch(d=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, d, generator=g, dtype=torch.float64)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True  # left-aligned padding: what the nested-tensor path takes
    pad[2, 3:] = True
    return x, pad


def plain_merged(model):
    """The same function with the adapters folded in and the LoRA layers gone: torch's own layers,
    so its fast paths compute the adapted model."""
    return ftk.unload_lora(copy.deepcopy(model), merge=True)


@pytest.mark.parametrize("targets", [["linear1"], ["linear1", "linear2"]])
@pytest.mark.parametrize("norm_first", [False, True])
def test_eval_inference_runs_the_adapters(targets, norm_first):
    model = encoder(norm_first=norm_first)
    ftk.apply_lora(model, targets, r=4)
    randomize_adapters(model)
    model.eval()
    ref = plain_merged(model).eval()
    x, pad = padded_batch()
    keep = ~pad
    with torch.no_grad():
        want = ref(x)  # torch's fused path on the merged weights (fast path and slow path agree there)
        with _no_fast():
            slow = model(x)
        got = model(x)
        got_pad = model[0](x, src_key_padding_mask=pad)
        want_pad = ref[0](x, src_key_padding_mask=pad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_pad[keep], want_pad[keep], rtol=1e-10, atol=1e-10)
    # without the adapters the output differs: they did run
    base = ftk.unload_lora(copy.deepcopy(model), merge=False).eval()
    with torch.no_grad():
        assert (base(x) - got).abs().max() > 1e-2
    # training-mode and grad-enabled calls agree with the inference one
    y = model(x)
    torch.testing.assert_close(y.detach(), got, rtol=1e-12, atol=1e-12)


class _no_fast:
    """``torch.backends.mha`` fast path off for a block (torch without ``flags``)."""

    def __enter__(self):
        self.old = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.old)


def test_unload_restores_the_fast_paths():
    model = encoder()
    enc = model[0]
    assert enc.use_nested_tensor
    ftk.apply_lora(model, ["linear1", "linear2"], r=4)
    assert not enc.use_nested_tensor
    bases = [m.base for m in lora_modules(model).values()]
    assert all(fast_path_guard in b._forward_pre_hooks.values() for b in bases)
    ftk.unload_lora(model, merge=True)
    assert enc.use_nested_tensor
    assert not any(b._forward_pre_hooks for b in bases)
    # applied again: no "forward hooks" warning for the guard left behind, and the guard is back
    ftk.apply_lora(model, ["linear1"], r=4)
    assert not enc.use_nested_tensor


def test_guard_survives_pickle_and_deepcopy():
    import pickle

    model = encoder()
    ftk.apply_lora(model, ["linear2"], r=4)
    randomize_adapters(model)
    model.eval()
    x, _ = padded_batch()
    with torch.no_grad():
        want = plain_merged(model).eval()(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(x), want, rtol=1e-10, atol=1e-10)


def test_layer_built_by_hand_is_guarded():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True).double()
    layer.linear1 = ftk.nn.LoRALinear(layer.linear1, r=2)
    randomize_adapters(layer)
    layer.eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    with _no_fast():
        want = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_from_peft_layers_are_guarded():
    from peft import LoraConfig, get_peft_model

    model = encoder()
    peft_model = get_peft_model(model, LoraConfig(target_modules=["linear1"], r=4, init_lora_weights=False))
    x, _ = padded_batch()
    peft_model.eval()
    with torch.no_grad(), _no_fast():
        want = peft_model(x)  # PEFT's layers are right only off the fast path
    ours = ftk.from_peft(peft_model).eval()
    assert not ours[0].use_nested_tensor
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-10)
