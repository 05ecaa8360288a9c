"""The Transformer: causal attention for AR, bidirectional for diffusion, and SUBS's V outputs."""

import pytest
import torch
import torch.nn.functional as F


V, N = 23, 12


@pytest.fixture(params=["learned", "rope"])
def positions(request):
    return request.param


def tiny(build, objective, positions, **model):
    torch.manual_seed(0)
    cfg = {"d_model": 32, "n_heads": 4, "positions": positions, **model}
    return build(vocab_size=V, seq_len=N, objective=objective, model=cfg)


def test_causal_net_never_looks_ahead(build, positions):
    net = tiny(build, "ar", positions).model.net.eval()
    assert net.causal
    x = torch.randint(0, V + 1, (3, N), generator=torch.Generator().manual_seed(1))
    base = net(x)
    for j in range(N):
        changed = x.clone()
        changed[:, j:] = (changed[:, j:] + 1 + torch.arange(N - j)) % (V + 1)  # every later token
        out = net(changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4  # position j sees its own input


def test_bidirectional_net_sees_the_whole_sequence(build, positions):
    net = tiny(build, "diffusion", positions).model.net.eval()
    assert not net.causal
    x = torch.randint(0, V + 1, (3, N), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % (V + 1)
    diff = (net(changed) - net(x)).abs().amax(-1)  # [B, N]
    assert (diff[:, 0] > 1e-4).all()  # the first position reacts to the last token


@pytest.mark.parametrize("tied", [False, True])
def test_subs_output_has_no_mask_column(build, positions, tied):
    """The head scores the V real tokens only: the mask id (= V) gets probability 0."""
    built = tiny(build, "diffusion", positions, tied_embeddings=tied)
    net, vocab = built.model.net, built.vocab
    assert vocab.mask_id == V and net.tok_emb.num_embeddings == V + 1
    x = torch.full((2, N), vocab.mask_id)  # the mask id is a valid input
    x[:, ::3] = torch.arange(0, N, 3) % V
    logits = net(x)
    assert logits.shape == (2, N, V)
    assert torch.isfinite(logits).all()
    if tied:  # the tied head is the input embedding without its mask row
        captured = {}
        net.ln_f.register_forward_hook(lambda module, args, out: captured.update(h=out))
        logits = net(x)
        torch.testing.assert_close(logits, F.linear(captured["h"], net.tok_emb.weight[:V]))

def test_too_long_input_is_an_error(build):
    net = tiny(build, "diffusion", "learned").model.net
    with pytest.raises(ValueError, match="max length"):
        net(torch.zeros(1, N + 1, dtype=torch.long))


@pytest.mark.parametrize("norm, mlp", [("layernorm", "gelu"), ("rmsnorm", "swiglu")])
def test_a_bf16_model_runs_without_autocast(build, norm, mlp):
    """DeepSpeed's bf16 mode casts the weights and runs no autocast: RoPE must keep q, k in the
    activations' dtype (float32 angle tables once made queries float32 next to bf16 values)."""
    net = tiny(build, "diffusion", "rope", norm=norm, mlp=mlp).model.net.to(torch.bfloat16).eval()
    x = torch.randint(0, V + 1, (2, N), generator=torch.Generator().manual_seed(1))
    logits = net(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_seed_architecture_parameter_count(build):
    """The tiny recipes' model: the seed's 6,539,712 parameters plus the mask token's embedding row."""
    built = build(vocab_size=50257, seq_len=128, model={
        "n_layers": 2, "d_model": 64, "n_heads": 4, "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu",
        "bias": False, "tied_embeddings": False})
    assert built.model.net.num_parameters() == 6_539_712 + 64
