import json
import random

import pytest
import torch

from samout import SamOut, SamOutConfig, State
from samout.config import MIXERS, PRESETS
from samout.layers.kv_cache import kv_buffer
from tests.helpers import MODEL_VARIANTS, random_chunks

VARIANTS = list(MODEL_VARIANTS)

# The seed article for seed-001 prints 2,763,532 parameters; the real model has this many.
SEED_001_PARAMETERS = 21_266_480
OPENASH_85M_PARAMETERS = 84_930_864


def _tiny(mixer: str, variant: str = "maxstate", **kw) -> SamOut:
    model = SamOut(SamOutConfig.from_preset("tiny", mixer=mixer, **MODEL_VARIANTS[variant], **kw))
    with torch.no_grad():  # alphas away from 0.5 so every term matters
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mixer", MIXERS)
def test_causal_exactly(seed, mixer, variant):
    model = _tiny(mixer, variant)
    ids = torch.randint(0, 512, (2, 24))
    t = random.Random(seed).randrange(1, 24)
    other = ids.clone()
    other[:, t] = (ids[:, t] + 1 + torch.randint(0, 510, (2,))) % 512
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(other)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t], b[:, t])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mixer", MIXERS)
def test_chunked_equals_full(seed, mixer, variant):
    rng = random.Random(seed)
    model = _tiny(mixer, variant)
    ids = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        full, full_state = model(ids)
        scale = full.abs().max()
        for chunking in ([1] * 40, random_chunks(40, rng), random_chunks(40, rng)):
            outs, state, t = [], None, 0
            for n in chunking:
                out, state = model(ids[:, t : t + n], state=state)
                outs.append(out)
                t += n
            assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5 * scale, chunking
            for a, b in zip(state.to_tensors().values(), full_state.to_tensors().values()):
                assert a.shape == b.shape
                assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("variant", ["maxstate", "decay"])  # attention: test_attention_state_size
@pytest.mark.parametrize("mixer", MIXERS)
def test_state_size_does_not_grow(mixer, variant):
    model = _tiny(mixer, variant)
    with torch.no_grad():
        _, s1 = model(torch.randint(0, 512, (2, 3)))
        _, s2 = model(torch.randint(0, 512, (2, 300)))
        _, s3 = model(torch.randint(0, 512, (2, 1)), state=s2)
    assert s1.nbytes == s2.nbytes == s3.nbytes
    assert [t.shape for t in s1.to_tensors().values()] == [t.shape for t in s3.to_tensors().values()]
    h, dh = model.config.num_heads, model.config.head_dim
    assert s1.nbytes == model.config.num_layers * 2 * h * dh * 4


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_state_is_the_same_as_no_state(seed, variant):
    model = _tiny("gen4", variant)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        a, sa = model(ids)
        b, sb = model(ids, state=model.init_state(2))
    assert torch.equal(a, b) and sa.equal(sb)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_round_trips_and_reorders(seed, variant, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny("openash", variant)
    ids = torch.randint(0, 512, (3, 5))
    more = torch.randint(0, 512, (3, 2))
    with torch.no_grad():
        _, state = model(ids)
        again = State.from_tensors(state.to_tensors())
        assert again.equal(state)
        save_file(state.map(torch.Tensor.contiguous).to_tensors(), tmp_path / "state.safetensors")
        loaded = State.from_tensors(load_file(tmp_path / "state.safetensors"))
        assert loaded.equal(state)
        idx = torch.tensor([2, 0, 0])
        picked = state.index_select(idx)
        assert picked.batch_size == 3
        for name, t in state[0].items():
            assert torch.equal(picked[0][name][1], t[0])
        # Continuing from the reordered state is continuing the reordered rows.
        a, _ = model(more[idx], picked)
        b, _ = model(torch.cat([ids[idx], more[idx]], 1))
        # to float rounding at the logits' scale (attention layers compute other shapes)
        torch.testing.assert_close(a, b[:, 5:], rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        c, _ = model(more, loaded)
        assert torch.equal(c, model(more, state)[0])


def test_parameter_counts():
    assert SamOut(SamOutConfig.from_preset("openash-85m")).num_parameters() == OPENASH_85M_PARAMETERS
    assert SamOut(SamOutConfig.from_preset("seed-001")).num_parameters() == SEED_001_PARAMETERS


def test_tied_head_counts_once():
    untied = SamOut(SamOutConfig.from_preset("tiny"))
    tied = SamOut(SamOutConfig.from_preset("tiny", tie_word_embeddings=True))
    assert untied.num_parameters() - tied.num_parameters() == 512 * 64
    assert tied.head.weight is tied.embed.weight


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0, 512]]), "token id 512 is out of range for vocab_size 512"),
    (torch.tensor([[-3, 1]]), "token id -3 is out of range"),
    (torch.tensor([1, 2]), "shape [batch, time]"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
])
def test_bad_input_ids_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _tiny("gen3")(bad)


def test_float_input_ids_raise_type_error():
    with pytest.raises(TypeError, match="integer tensor"):
        _tiny("gen3")(torch.zeros(1, 3))


def test_state_from_another_batch_size_is_rejected():
    model = _tiny("gen3")
    _, state = model(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="running_max must have shape"):
        model(torch.zeros(3, 1, dtype=torch.long), state=state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=100, num_heads=8), "divisible by num_heads"),
    (dict(mixer="softmax"), "unknown mixer"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(vocab_size=-5), "vocab_size must be a positive integer"),
    (dict(padding_idx=9000), "padding_idx"),
])
def test_impossible_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamOutConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope': choose one of"):
        SamOutConfig.from_preset("nope")


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_json_round_trip(tmp_path, name):
    config = SamOutConfig.from_preset(name)
    assert SamOutConfig.from_json(config.to_json()) == config
    config.to_json(tmp_path / "c.json")
    assert SamOutConfig.from_json(tmp_path / "c.json") == config


def test_config_from_another_format_version():
    data = json.loads(SamOutConfig().to_json())
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        SamOutConfig.from_dict(data)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load(tmp_path, seed, tie, variant):
    model = _tiny("conv", variant, tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    loaded = SamOut.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()


def test_load_errors(tmp_path):
    from samout.run_dir import CheckpointError

    with pytest.raises(CheckpointError, match="config.json is missing"):
        SamOut.from_pretrained(tmp_path)
    _tiny("gen3").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        SamOut.from_pretrained(tmp_path)


@pytest.mark.parametrize("mixer, variant", [(m, "maxstate") for m in MIXERS]
                         + [("openash", v) for v in VARIANTS if v != "maxstate"])
def test_overfits_a_small_batch_of_real_text(shakespeare_text, mixer, variant):
    torch.manual_seed(0)
    data = torch.tensor(list(shakespeare_text[5000:7000].encode("utf-8")), dtype=torch.long)
    batch = data[: 4 * 65].view(4, 65)
    model = SamOut(SamOutConfig.from_preset("tiny", mixer=mixer, **MODEL_VARIANTS[variant]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::15]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mixer", ["gen4", "openash", "conv"])
def test_fused_model_equals_reference_model(seed, mixer, variant):
    # The whole model with either kernel: logits, states and every parameter gradient.
    model = _tiny(mixer, variant).double()
    ids = torch.randint(0, 512, (2, 19))
    outs = []
    for kernel in ("fused", "reference"):
        model.set_kernel(kernel)
        model.zero_grad()
        logits, state = model(ids)
        logits.logsumexp(-1).sum().backward()
        outs.append((logits.detach(), state, [p.grad.clone() for p in model.parameters()]))
    (lf, sf, gf), (lr, sr, gr) = outs
    # Layer 0's state is a running max of identical streams; later layers see inputs
    # that differ by rounding.
    if variant == "maxstate":
        assert torch.equal(sf[0]["running_max"], sr[0]["running_max"])
    torch.testing.assert_close(sf.to_tensors(), sr.to_tensors(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=1e-10)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert model.config.kernel == "reference"


def test_fused_model_saves_less_for_backward(seed):
    # The fused kernels keep fewer bytes for backward and no int64 indices.
    model = _tiny("gen4")
    ids = torch.randint(0, 512, (2, 64))

    def saved_bytes(kernel):
        model.set_kernel(kernel)
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, _ = model(ids)
        return sum(t.untyped_storage().nbytes() for t in seen.values()), seen.values()

    fused, fused_tensors = saved_bytes("fused")
    ref, _ = saved_bytes("reference")
    assert not any(t.dtype == torch.int64 and t.dim() == 4 for t in fused_tensors)
    assert fused < 0.9 * ref


# -- issue 14: hybrid layers and the forgetting running max -----------------------

@pytest.mark.parametrize("mixer", MIXERS)
def test_max_decay_with_zero_delta_is_bit_identical(seed, mixer):
    # δ = softplus(-inf) = 0 exactly: the decayed scans must give today's bits, with
    # either kernel, in the full and the chunked form, values and state.
    plain = _tiny(mixer)
    decayed = SamOut(SamOutConfig.from_preset("tiny", mixer=mixer, max_decay=True)).eval()
    missing, unexpected = decayed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("decay_theta" in k for k in missing)
    with torch.no_grad():
        for layer in decayed.layers:
            layer.mixer.decay_theta.fill_(float("-inf"))
    ids = torch.randint(0, 512, (2, 30))
    for kernel in ("fused", "reference"):
        plain.set_kernel(kernel)
        decayed.set_kernel(kernel)
        with torch.no_grad():
            a, sa = plain(ids)
            b, sb = decayed(ids)
            assert torch.equal(a, b) and sa.equal(sb)
            a2, _ = plain(ids[:, 7:], plain(ids[:, :7])[1])
            b2, _ = decayed(ids[:, 7:], decayed(ids[:, :7])[1])
            assert torch.equal(a2, b2)


def test_max_decay_is_learnable_and_starts_small():
    model = SamOut(SamOutConfig.from_preset("tiny", max_decay=True))
    names = [n for n, _ in model.named_parameters() if "decay_theta" in n]
    assert len(names) == 2
    mixer = model.layers[0].mixer
    torch.testing.assert_close(mixer.decay(), torch.full((4, 16), 1e-3))
    # One per head-channel; 1-D, so AdamW's weight decay (matrices only) leaves it alone.
    assert mixer.decay_theta.shape == (64,)
    ids = torch.randint(0, 512, (2, 12))
    model(ids)[0].square().mean().backward()
    assert mixer.decay_theta.grad.abs().sum() > 0


def test_decay_forgets_an_old_maximum():
    # A spike early in the max stream must fade out of the state at rate δ per step.
    model = SamOut(SamOutConfig.from_preset("tiny", max_decay=True, max_decay_init=0.5))
    mixer = model.layers[0].mixer
    streams = torch.full((1, 21, 4, 4, 16), -100.0)
    streams[:, 0, 2] = 10.0
    _, state = mixer.mix(streams)
    torch.testing.assert_close(state, torch.full((1, 4, 16), 10.0 - 20 * 0.5))


def test_hybrid_layers_and_parameter_matching():
    config = SamOutConfig.from_preset("hybrid-small")
    assert config.resolved_layer_types == ["maxstate", "attention", "maxstate", "maxstate"]
    assert SamOutConfig.from_preset("tiny", num_layers=8, attention_every=4).resolved_layer_types == \
        ["maxstate"] * 3 + ["attention"] + ["maxstate"] * 3 + ["attention"]
    with torch.device("meta"):
        hybrid, plain = SamOut(config), SamOut(SamOutConfig.from_preset("small"))
    h, d = config.num_heads, config.hidden_size
    # The attention layer's q, k, v, o (4 D^2) replace openash's 4-stream projection
    # (4 D^2) and its head mixing and alphas (5 H^2 + 3); each of the three maxstate
    # layers gains its decay θ (D).
    assert plain.num_parameters() - hybrid.num_parameters() == 5 * h * h + 3 - 3 * d
    assert sum(p.numel() for p in hybrid.layers[1].mixer.parameters()) == 4 * d * d
    swa = SamOutConfig.from_preset("hybrid-small-swa")
    assert swa.attention_window == 256 and swa.resolved_layer_types == config.resolved_layer_types


@pytest.mark.parametrize("window", [None, 4])
def test_attention_state_size(window):
    model = _tiny("openash", layer_types=["maxstate", "attention"], attention_window=window)
    with torch.no_grad():
        _, s = model(torch.randint(0, 512, (2, 3)))
        sizes = [s.nbytes]
        for _ in range(6):
            _, s = model(torch.randint(0, 512, (2, 1)), state=s)
            sizes.append(s.nbytes)
    kept = s[1]["key"].shape[2]
    if window is None:
        assert kept == 9 and sizes == sorted(set(sizes))  # a KV cache: grows every token
    else:
        assert kept == window - 1 and len(set(sizes[1:])) == 1  # bounded by the window


def test_window_hides_tokens_outside_it_from_attention(seed):
    # An attention-only model: a token W or more positions back cannot change the output.
    model = _tiny("openash", layer_types=["attention", "attention"], attention_window=4)
    ids = torch.randint(2, 512, (1, 12))
    other = ids.clone()
    other[0, 2] = 1
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(other)
    # Position 2 reaches positions 2..5 in layer 1, and 2..8 after two layers.
    assert torch.equal(a[:, 9:], b[:, 9:])
    assert not torch.equal(a[:, 2:9], b[:, 2:9])


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer_types=["maxstate"]), "one kind per layer"),
    (dict(layer_types=["maxstate", "mamba", "maxstate", "maxstate"]), "unknown layer type 'mamba'"),
    (dict(layer_types=["maxstate"] * 4, attention_every=2), "not both"),
    (dict(attention_every=0), "attention_every must be a positive integer"),
    (dict(attention_window=-1), "attention_window must be a positive integer"),
    (dict(max_decay="yes"), "max_decay must be true or false"),
    (dict(max_decay_init=0), "max_decay_init must be a positive number"),
])
def test_impossible_hybrid_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamOutConfig(**kwargs)


def test_attention_state_of_the_wrong_shape_is_rejected():
    model = _tiny("openash", layer_types=["attention", "maxstate"], attention_window=3)
    _, state = model(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="key and value must have shape"):
        model(torch.zeros(3, 1, dtype=torch.long), state=state)
    state[0]["key"] = torch.zeros(2, 4, 5, 16)
    state[0]["value"] = torch.zeros(2, 4, 5, 16)
    with pytest.raises(ValueError, match="keeps at most 2 keys"):
        model(torch.zeros(2, 1, dtype=torch.long), state=state)
@pytest.mark.parametrize("mixer", ["gen4", "openash"])
def test_channel_major_head_merge_is_the_same_layer_up_to_a_column_permutation(mixer, seed):
    # docs/architecture.md, "Head merge order": the author's code merges heads
    # channel-major (feature c*H + h), samout head-major (h*dh + c). A channel-major layer
    # whose ffn1 and gate weights are W_o computes what samout computes with W_o[:, perm].
    config = SamOutConfig.from_preset("tiny", mixer=mixer, hidden_size=24, num_heads=4)
    layer = SamOut(config).layers[0]
    h, dh, d = config.num_heads, config.head_dim, config.hidden_size
    perm = torch.arange(d).view(dh, h).T.reshape(-1)  # perm[h*dh + c] = c*H + h
    assert perm[1 * dh + 2] == 2 * h + 1
    x = torch.randn(2, 7, d)
    streams = layer.mixer.project(x)
    y, _ = layer.mixer.mix(streams)  # [B, T, H, dh]
    head_major = y.reshape(2, 7, d)
    channel_major = y.transpose(-1, -2).reshape(2, 7, d)  # the author's transpose(1, 2).view
    w_o = {name: torch.randn(d, d) for name in ("ffn1", "gate")}
    with torch.no_grad():
        for name, w in w_o.items():
            getattr(layer.ffn, name).weight.copy_(w[:, perm])
    ffn = layer.ffn
    theirs = ffn.ffn2(torch.nn.functional.linear(channel_major, w_o["ffn1"], ffn.ffn1.bias)
                      * torch.relu(torch.nn.functional.linear(channel_major, w_o["gate"], ffn.gate.bias)))
    torch.testing.assert_close(ffn(head_major), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x)[0], layer.layer_norm(layer.alpha * theirs + (1 - layer.alpha) * x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_to_keep_is_the_tail_of_the_full_logits(seed, variant):
    """A prefill asks for the last position only: the same numbers and the same state."""
    model = _tiny("openash", variant)
    ids = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        full, full_state = model(ids)
        for n in (1, 5, 13, 40):  # past T: every position, as slicing does
            part, state = model(ids, logits_to_keep=n)
            assert part.shape == (2, min(n, 13), 512)
            assert torch.allclose(part, full[:, -n:], rtol=0, atol=1e-6 * float(full.abs().max()))
            for a, b in zip(state.to_tensors().values(), full_state.to_tensors().values()):
                assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "1"])
def test_bad_logits_to_keep_is_a_value_error(bad):
    with pytest.raises(ValueError, match="logits_to_keep must be an integer"):
        _tiny("openash")(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=bad)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mixer", MIXERS)
def test_one_token_step_path_equals_the_plain_forward(seed, mixer, variant):
    """Decoding (one token, no autograd) takes DecoderLayer.step, the lean form; with
    autograd on, the same call runs the plain layers. Same logits to rounding, same state."""
    model = _tiny(mixer, variant)
    ids = torch.randint(0, 512, (3, 9))
    with torch.no_grad():
        _, state = model(ids[:, :8])
    tok = ids[:, 8:]
    with torch.no_grad():
        assert model._steps(tok)
        fast, fast_state = model(tok, state)
    with torch.enable_grad():
        assert not model._steps(tok)
        plain, plain_state = model(tok, state)
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()
    # The first layer's state is the same max of the same numbers; deeper layers see inputs
    # that differ by rounding (the blend is a lerp in the step).
    first = ("key", "value") if model.layers[0].kind == "attention" else ("running_max",)
    assert all(torch.equal(fast_state[0][k], plain_state[0][k]) for k in first)
    for a, b in zip(fast_state.to_tensors().values(), plain_state.to_tensors().values()):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    model.set_kernel("reference")
    with torch.no_grad():
        assert not model._steps(tok)


def test_hybrid_preallocated_kv_cache_equals_concatenation(seed):
    """SamOut.set_kv_cache("concat") is the reference for the hybrids' attention caches:
    the same logits and states over a prefill and one-token steps."""
    config = SamOutConfig.from_preset("tiny", vocab_size=64, **MODEL_VARIANTS["hybrid"])
    model, reference = SamOut(config).eval(), SamOut(config).eval()
    reference.load_state_dict(model.state_dict())
    assert reference.set_kv_cache("concat") is reference
    ids = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        out, state = model(ids[:, :20])
        ref, ref_state = reference(ids[:, :20])
        for t in range(20, 30):
            out, state = model(ids[:, t:t + 1], state)
            ref, ref_state = reference(ids[:, t:t + 1], ref_state)
            assert torch.equal(out, ref)
    assert state.equal(ref_state)
    assert kv_buffer(state[1]["key"]) is not None and kv_buffer(ref_state[1]["key"]) is None
    with pytest.raises(ValueError, match="unknown kv cache 'paged'"):
        model.set_kv_cache("paged")
