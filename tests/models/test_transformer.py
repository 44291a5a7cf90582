import json
import math
import random

import pytest
import torch

from samout import SamOut, SamOutConfig, State, Transformer, TransformerConfig, load_pretrained
from samout.config import MIXERS, PRESETS
from samout.layers.kv_cache import kv_buffer
from samout.models import MODEL_CLASSES
from samout.models.transformer import PaddedKVBatch, cache_row, left_pad_caches
from samout.models.transformer_config import BASELINE_STYLES, MATCH_TOLERANCE, match_transformer_to
from tests.helpers import random_chunks

VOCAB = 97


def _tiny(**kw) -> Transformer:
    config = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48)
    return Transformer(TransformerConfig(**{**config, **kw})).eval()


MODERN = BASELINE_STYLES["modern"]
VARIANTS = [dict(), dict(positional="rotary"), dict(norm="post"), dict(activation="gelu"), MODERN,
            dict(MODERN, norm="post"), dict(norm_type="rmsnorm"), dict(activation="swiglu")]


@pytest.mark.parametrize("kw", VARIANTS)
def test_causal_exactly(seed, kw):
    model = _tiny(**kw)
    ids = torch.randint(0, VOCAB, (2, 24))
    t = random.Random(seed).randrange(1, 24)
    other = ids.clone()
    other[:, t] = (ids[:, t] + 1 + torch.randint(0, VOCAB - 2, (2,))) % VOCAB
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(other)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t], b[:, t])


@pytest.mark.parametrize("kw", VARIANTS)
def test_chunked_equals_full(seed, kw):
    rng = random.Random(seed)
    model = _tiny(**kw)
    ids = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        full, full_state = model(ids)
        scale = full.abs().max()
        for chunking in ([1] * 40, random_chunks(40, rng), random_chunks(40, rng), [40]):
            outs, state, t = [], None, 0
            for n in chunking:
                out, state = model(ids[:, t : t + n], state=state)
                outs.append(out)
                t += n
            assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5 * scale, chunking
            for a, b in zip(state, full_state):
                for name in ("key", "value"):
                    assert a[name].shape == b[name].shape
                    assert (a[name] - b[name]).abs().max() <= 1e-5 * b[name].abs().max()


def test_kv_cache_grows_with_tokens():
    model = _tiny()
    with torch.no_grad():
        _, s1 = model(torch.randint(0, VOCAB, (2, 3)))
        _, s2 = model(torch.randint(0, VOCAB, (2, 5)), state=s1)
        _, s3 = model(torch.randint(0, VOCAB, (2, 1)), state=s2)
    per_token = 2 * 2 * 4 * 8 * 2 * 4  # layers * (k, v) * heads * dh * batch * float32
    assert [s.nbytes for s in (s1, s2, s3)] == [3 * per_token, 8 * per_token, 9 * per_token]
    assert s3[1]["key"].shape == (2, 4, 9, 8)


def test_init_state_is_the_same_as_no_state(seed):
    model = _tiny(positional="rotary")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a, sa = model(ids)
        b, sb = model(ids, state=model.init_state(2))
    assert torch.equal(a, b) and sa.equal(sb)


def test_state_reorders_for_beam_search(seed):
    model = _tiny()
    ids = torch.randint(0, VOCAB, (3, 6))
    nxt = torch.randint(0, VOCAB, (3, 1))
    with torch.no_grad():
        _, state = model(ids)
        picked = State.from_tensors(state.to_tensors()).index_select(torch.tensor([2, 0]))
        a, _ = model(nxt[[2, 0]], state=picked)
        b, _ = model(torch.cat((ids, nxt), 1)[[2, 0]])
    assert (a[:, 0] - b[:, -1]).abs().max() <= 1e-5 * b.abs().max()


def _naive_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The model written out with explicit softmax attention and explicit positions: the
    plain forward (no cache_lengths) must still equal it."""
    c = model.config
    b, t = ids.shape
    pos = torch.arange(t, dtype=torch.float64)
    x = model.embed(ids)
    if c.positional == "sinusoidal":
        pe = torch.zeros(t, c.hidden_size, dtype=torch.float64)
        for i in range(0, c.hidden_size, 2):
            pe[:, i] = torch.sin(pos / 10000 ** (i / c.hidden_size))
            pe[:, i + 1] = torch.cos(pos / 10000 ** (i / c.hidden_size))
        x = x + pe.float()
    else:
        inv = c.rope_theta ** (-torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
        ang = torch.cat((pos[:, None] * inv, pos[:, None] * inv), -1)
        cos, sin = ang.cos().float(), ang.sin().float()

    def attn(layer, h):
        q, k, v = layer.qkv(h).view(b, t, 3, c.num_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        if c.positional == "rotary":
            half = c.head_dim // 2
            q, k = [z * cos + torch.cat((-z[..., half:], z[..., :half]), -1) * sin for z in (q, k)]
        scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        return layer.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c.hidden_size))

    for layer in model.layers:
        if c.norm == "pre":
            x = x + attn(layer.attn, layer.attn_norm(x))
            x = x + layer.ffn(layer.ffn_norm(x))
        else:
            x = layer.attn_norm(x + attn(layer.attn, x))
            x = layer.ffn_norm(x + layer.ffn(x))
    if model.norm is not None:
        x = model.norm(x)
    return model.head(x)


@pytest.mark.parametrize("kw", VARIANTS)
def test_plain_forward_equals_the_written_out_model(seed, kw):
    model = _tiny(**kw)
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        got, _ = model(ids)
        want = _naive_forward(model, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("kw", VARIANTS)
def test_padded_caches_of_different_lengths_equal_each_row_alone(seed, kw):
    """The serving engine's batched decode: left-padded caches + cache_lengths give each
    row what it gets alone (one-token steps and chunks), and its cache without the padding."""
    rng = random.Random(seed)
    model = _tiny(**kw)
    lengths = [rng.randint(1, 20) for _ in range(4)] + [0]
    histories = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    with torch.no_grad():
        states = [model(h)[1] if n else model.init_state(1) for h, n in zip(histories, lengths)]
        padded, cache_lengths = left_pad_caches(states)
        assert cache_lengths.tolist() == lengths
        for step in (1, 3, 1):  # decode steps, then a chunk, then a step again
            new = torch.randint(0, VOCAB, (len(lengths), step))
            logits, padded = model(new, padded, cache_lengths=cache_lengths)
            cache_lengths = cache_lengths + step
            for j in range(len(lengths)):
                alone, states[j] = model(new[j:j + 1], states[j])
                assert (logits[j:j + 1] - alone).abs().max() <= 1e-5 * alone.abs().max()
                row = cache_row(padded, j, int(cache_lengths[j]))
                for a, b in zip(row, states[j]):
                    assert a["key"].shape == b["key"].shape
                    assert (a["value"] - b["value"]).abs().max() <= 1e-5 * b["value"].abs().max()


def test_padded_kv_batch_steps_like_each_row_alone(seed):
    """The Transformer's state batching (what the serving engine calls): one key for every
    cache, and after each step each row's state is its own cache without the padding."""
    model = _tiny()
    assert model.state_batch is PaddedKVBatch
    with torch.no_grad():
        states = [model(torch.randint(0, VOCAB, (1, n)))[1] for n in (3, 7, 5)]
        assert len({PaddedKVBatch.key(s) for s in states}) == 1
        batch = PaddedKVBatch(states)
        for _ in range(2):
            new = torch.randint(0, VOCAB, (3, 1))
            logits, state = model(new, batch.state, **batch.model_kwargs())
            batch.advance(state, 1)
            for j, row in enumerate(batch.rows()):
                alone, states[j] = model(new[j:j + 1], states[j])
                assert (logits[j:j + 1] - alone).abs().max() <= 1e-5 * alone.abs().max()
                assert row[0]["key"].shape == states[j][0]["key"].shape
    assert batch.lengths == [5, 9, 7] and batch.nbytes == batch.state.nbytes


def test_equal_cache_lengths_equal_the_plain_call(seed):
    model = _tiny(positional="rotary")
    ids, nxt = torch.randint(0, VOCAB, (3, 8)), torch.randint(0, VOCAB, (3, 2))
    with torch.no_grad():
        _, state = model(ids)
        plain, plain_state = model(nxt, state)
        masked, masked_state = model(nxt, state, cache_lengths=torch.full((3,), 8))
        first, _ = model(ids, cache_lengths=torch.zeros(3, dtype=torch.long))
    assert (plain - masked).abs().max() <= 1e-5 * plain.abs().max()
    assert (first - model(ids)[0]).abs().max() <= 1e-5 * first.abs().max()
    assert masked_state[1]["key"].shape == plain_state[1]["key"].shape


def test_bad_cache_lengths_are_rejected():
    model = _tiny(max_position_embeddings=16)
    with torch.no_grad():
        _, state = model(torch.zeros(2, 5, dtype=torch.long))
        one = torch.zeros(2, 1, dtype=torch.long)
        with pytest.raises(ValueError, match=r"must lie in \[0, 5\]"):
            model(one, state, cache_lengths=torch.tensor([6, 2]))
        with pytest.raises(ValueError, match=r"shape \(2,\)"):
            model(one, state, cache_lengths=torch.tensor([5]))
        with pytest.raises(ValueError, match="integer tensor"):
            model(one, state, cache_lengths=torch.tensor([5.0, 2.0]))
        _, long_state = model(torch.zeros(2, 15, dtype=torch.long))
        with pytest.raises(ValueError, match=r"\(15 cached \+ 2 new\)"):
            model(torch.zeros(2, 2, dtype=torch.long), long_state, cache_lengths=torch.tensor([15, 3]))


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_context_limit_is_a_clear_error(positional):
    model = _tiny(max_position_embeddings=16, positional=positional)
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long))
        with pytest.raises(ValueError, match="17 tokens .* exceeds max_position_embeddings=16"):
            model(torch.zeros(1, 17, dtype=torch.long))
        _, state = model(torch.zeros(1, 10, dtype=torch.long))
        with pytest.raises(ValueError, match=r"\(10 cached \+ 7 new\)"):
            model(torch.zeros(1, 7, dtype=torch.long), state=state)


@pytest.mark.parametrize("kw", [dict(), dict(norm="post"), dict(tie_word_embeddings=True), MODERN,
                                dict(MODERN, norm="post"), dict(bias=False), dict(activation="swiglu"),
                                dict(norm_type="rmsnorm", bias=True)])
def test_parameter_formula_is_exact(kw):
    model = _tiny(**kw)
    assert model.num_parameters(exclude_embeddings=True) == model.config.non_embedding_parameters()
    embeddings = VOCAB * 32 * (1 if kw.get("tie_word_embeddings") else 2)
    assert model.num_parameters() == model.config.non_embedding_parameters() + embeddings


def _samout_non_embedding(config: SamOutConfig) -> int:
    return SamOut(config).num_parameters(exclude_embeddings=True)


@pytest.mark.parametrize("baseline", list(BASELINE_STYLES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_matched_within_two_percent_for_every_preset(preset, baseline):
    config = SamOutConfig.from_preset(preset)
    with torch.device("meta"):
        target = _samout_non_embedding(config)
        matched = match_transformer_to(config, baseline=baseline)
        got = Transformer(matched).num_parameters(exclude_embeddings=True)
    assert abs(got - target) <= MATCH_TOLERANCE * target, (got, target)
    assert matched.style == baseline and matched.ffn_hidden_size % 8 == 0
    assert (matched.vocab_size, matched.hidden_size, matched.num_layers, matched.num_heads) == (
        config.vocab_size, config.hidden_size, config.num_layers, config.num_heads)


@pytest.mark.parametrize("baseline", list(BASELINE_STYLES))
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("preset", ["tiny", "seed-003"])
def test_matched_within_two_percent_for_every_mixer(preset, mixer, baseline):
    config = SamOutConfig.from_preset(preset, mixer=mixer)
    with torch.device("meta"):
        target = _samout_non_embedding(config)
        got = Transformer(match_transformer_to(config, baseline, positional="rotary")).num_parameters(True)
    assert abs(got - target) <= MATCH_TOLERANCE * target, (got, target)


def test_match_refuses_what_cannot_match():
    with pytest.raises(ValueError, match="chooses ffn_hidden_size itself"):
        match_transformer_to(SamOutConfig.from_preset("tiny"), ffn_hidden_size=10)
    with pytest.raises(ValueError, match="attention alone is larger"):
        match_transformer_to(SamOutConfig.from_preset("tiny"), num_layers=8)


@pytest.mark.parametrize("kw", [dict(), dict(positional="rotary", tie_word_embeddings=True)])
def test_save_and_load(tmp_path, seed, kw):
    model = _tiny(**kw)
    model.save_pretrained(tmp_path)
    assert '"model_type": "transformer"' in (tmp_path / "config.json").read_text()
    assert '"format_version"' in (tmp_path / "config.json").read_text()
    for loaded in (Transformer.from_pretrained(tmp_path), load_pretrained(tmp_path)):
        assert isinstance(loaded, Transformer) and loaded.config == model.config
        ids = torch.randint(0, VOCAB, (2, 7))
        with torch.no_grad():
            assert torch.equal(model(ids)[0], loaded.eval()(ids)[0])
    assert MODEL_CLASSES["transformer"] is Transformer


def test_a_samout_checkpoint_is_not_a_transformer(tmp_path):
    from samout.run_dir import CheckpointError

    SamOut(SamOutConfig.from_preset("tiny")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type must be 'transformer'"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0, VOCAB]]), f"token id {VOCAB} is out of range for vocab_size {VOCAB}"),
    (torch.tensor([[-3, 1]]), "token id -3 is out of range"),
    (torch.tensor([1, 2]), r"shape \[batch, time\]"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
])
def test_bad_input_ids_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        _tiny()(bad)


def test_float_input_ids_raise_type_error():
    with pytest.raises(TypeError, match="integer tensor"):
        _tiny()(torch.zeros(1, 3))


def test_wrong_states_are_rejected():
    model = _tiny()
    with torch.no_grad():
        _, state = model(torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match=r"key must have shape \(3, 4, T, 8\)"):
            model(torch.zeros(3, 1, dtype=torch.long), state=state)
        samout_state = SamOut(SamOutConfig.from_preset("tiny", vocab_size=VOCAB)).init_state(2)
        with pytest.raises(ValueError, match="state must be a samout State with 2 layers"):
            model(torch.zeros(2, 1, dtype=torch.long), state=State(samout_state.layers[:1]))
        with pytest.raises(ValueError, match="is this a Transformer KV cache"):
            model(torch.zeros(2, 1, dtype=torch.long), state=samout_state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
    (dict(positional="alibi"), "unknown positional 'alibi'"),
    (dict(norm="sandwich"), "unknown norm"),
    (dict(ffn_hidden_size=0), "ffn_hidden_size must be a positive integer"),
    (dict(max_position_embeddings=-1), "max_position_embeddings must be a positive integer"),
    (dict(padding_idx=500, vocab_size=100), "padding_idx"),
])
def test_impossible_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**kwargs)


@pytest.mark.parametrize("kw", [dict(), MODERN, dict(MODERN, rope_scaling={"type": "ntk", "factor": 4.0})])
def test_config_json_round_trip(tmp_path, kw):
    config = TransformerConfig(**{**dict(positional="rotary", norm="post", ffn_hidden_size=100), **kw})
    assert TransformerConfig.from_json(config.to_json()) == config


def test_an_old_config_without_the_style_fields_loads_as_seed_004(tmp_path):
    """config.json written before the styles existed (no norm_type, bias, rope_scaling)."""
    old = {"activation": "relu", "ffn_hidden_size": 48, "format_version": 1, "hidden_size": 32,
           "max_position_embeddings": 4096, "model_type": "transformer", "norm": "pre", "num_heads": 4,
           "num_layers": 2, "padding_idx": 0, "positional": "sinusoidal", "rope_theta": 10000.0,
           "tie_word_embeddings": False, "vocab_size": VOCAB}
    config = TransformerConfig.from_dict(old)
    assert config.style == "seed-004" and config.bias and config.norm_type == "layernorm"
    model = _tiny()  # the same sizes in today's defaults: the old weights load into it
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded.eval()(ids)[0])


def test_styles_and_presets():
    tiny = SamOutConfig.from_preset("tiny")
    assert match_transformer_to(tiny).style == "modern"
    assert match_transformer_to(tiny, "seed-004").style == "seed-004"
    assert match_transformer_to(tiny, positional="sinusoidal").style == "custom"
    assert TransformerConfig.from_preset("tiny").style == "modern"  # new training runs
    assert TransformerConfig.from_preset("tiny", baseline="seed-004").style == "seed-004"
    assert TransformerConfig.from_dict({"baseline": "modern", "ffn_hidden_size": 8}).style == "modern"
    assert TransformerConfig().style == "seed-004"
    with pytest.raises(ValueError, match="unknown baseline 'gpt2'"):
        match_transformer_to(tiny, "gpt2")
    modern = _tiny(**MODERN)
    assert not any(name.endswith("bias") for name, _ in modern.named_parameters())
    assert isinstance(modern.norm, torch.nn.RMSNorm)


# -- the preallocated KV cache against the concatenating reference ---------------------

def _pair(**kw) -> tuple[Transformer, Transformer]:
    model = _tiny(**kw)
    reference = _tiny(**kw)
    reference.load_state_dict(model.state_dict())
    reference.set_kv_cache("concat")
    return model, reference


@pytest.mark.parametrize("kw", [dict(), MODERN])
def test_preallocated_cache_equals_the_concatenating_reference(seed, kw):
    rng = random.Random(seed)
    model, reference = _pair(**kw)
    ids = torch.randint(0, VOCAB, (2, 150))  # past a block of 64 slots and one doubling
    with torch.no_grad():
        for chunking in ([1] * 150, random_chunks(150, rng), [150]):
            state = ref_state = None
            t = 0
            for n in chunking:
                out, state = model(ids[:, t:t + n], state)
                ref, ref_state = reference(ids[:, t:t + n], ref_state)
                assert torch.equal(out, ref), (chunking, t)
                t += n
            assert state.equal(ref_state)
            assert kv_buffer(state[0]["key"]) is not None and kv_buffer(ref_state[0]["key"]) is None


def test_decode_writes_in_place_and_grows_geometrically():
    model = _tiny(max_position_embeddings=1000)
    with torch.no_grad():
        _, state = model(torch.randint(0, VOCAB, (1, 60)))
        buffer = kv_buffer(state[0]["key"])
        assert buffer.data.shape[2] == 128  # 60 + a block of room, rounded up to blocks
        for _ in range(68):
            _, state = model(torch.randint(0, VOCAB, (1, 1)), state)
        assert kv_buffer(state[0]["key"]) is buffer  # 61..128: the same buffer, written in place
        assert state[0]["key"].data_ptr() == buffer.data.data_ptr()
        _, state = model(torch.randint(0, VOCAB, (1, 1)), state)
        grown = kv_buffer(state[0]["key"])
        assert grown is not buffer and grown.data.shape[2] == 256 and state[0]["key"].shape[2] == 129
        _, state = model(torch.randint(0, VOCAB, (1, 800)), state)  # 929 + 232 > the limit
        assert kv_buffer(state[0]["key"]).data.shape[2] == 1000


def test_an_older_state_stays_valid_and_branches_do_not_collide(seed):
    """Functional contract: continuing from a state twice (a cached prefix, two branches)
    gives each branch what a fresh call gives; neither overwrites the other."""
    model, reference = _pair(**MODERN)
    prefix = torch.randint(0, VOCAB, (1, 10))
    a_ids, b_ids = torch.randint(0, VOCAB, (1, 3)), torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        _, prefix_state = model(prefix)
        snapshot = prefix_state.clone()
        _, a_state = model(a_ids, prefix_state)
        _, b_state = model(b_ids, prefix_state)  # must not write over a's slots 10..12
        nxt = torch.randint(0, VOCAB, (1, 1))
        a_out, _ = model(nxt, a_state)
        b_out, _ = model(nxt, b_state)
        a_ref, _ = reference(torch.cat((prefix, a_ids, nxt), 1))
        b_ref, _ = reference(torch.cat((prefix, b_ids, nxt), 1))
    assert prefix_state.equal(snapshot)
    assert (a_out[:, -1] - a_ref[:, -1]).abs().max() <= 1e-5 * a_ref.abs().max()
    assert (b_out[:, -1] - b_ref[:, -1]).abs().max() <= 1e-5 * b_ref.abs().max()


def test_state_copies_start_their_own_buffer(seed):
    """State.stack / split / clone / index_select and left padding give ordinary tensors;
    the next call copies them into a buffer and leaves the originals alone."""
    model, reference = _pair()
    with torch.no_grad():
        states = [model(torch.randint(0, VOCAB, (1, n)))[1] for n in (4, 4)]
        stacked = State.stack(states)
        nxt = torch.randint(0, VOCAB, (2, 1))
        out, new = model(nxt, stacked)
        ref, _ = reference(nxt, stacked.clone())
        assert torch.equal(out, ref)
        for part, alone in zip(new.split(), states):
            assert part[0]["key"].shape[2] == 5 and alone[0]["key"].shape[2] == 4


def test_a_cache_made_under_inference_mode_continues_outside_it(seed):
    model, reference = _pair()
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.inference_mode():
        _, state = model(ids[:, :5])
    with torch.no_grad():
        out, state = model(ids[:, 5:6], state)  # copies: an inference tensor is read-only here
        out2, _ = model(ids[:, 6:], state)
        _, ref_state = reference(ids[:, :5])
        want, ref_state = reference(ids[:, 5:6], ref_state)
        want2, _ = reference(ids[:, 6:], ref_state)
    assert torch.equal(out, want) and torch.equal(out2, want2)


def test_training_through_a_cache_keeps_autograd(seed):
    """Under autograd the cache concatenates (in-place writes would break backward)."""
    model = _tiny(**MODERN).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    _, state = model(ids[:, :6])
    logits, _ = model(ids[:, 6:], state)
    logits.sum().backward()
    assert kv_buffer(state[0]["key"]) is None and model.embed.weight.grad is not None


def test_set_kv_cache_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="unknown kv cache 'paged'"):
        _tiny().set_kv_cache("paged")


# -- RoPE scaling ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ntk", "linear", "yarn"])
def test_rope_scaling_by_one_changes_nothing(seed, kind):
    model = _tiny(**MODERN)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        plain, _ = model(ids)
        model.set_rope_scaling({"type": kind, "factor": 1.0, **(
            {"original_max_position_embeddings": 16} if kind == "yarn" else {})})
        scaled, _ = model(ids)
    assert (plain - scaled).abs().max() <= 1e-5 * plain.abs().max()


@pytest.mark.parametrize("scaling", [{"type": "ntk", "factor": 4.0}, {"type": "linear", "factor": 2},
                                     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_rope_scaling_keeps_the_state_contract(seed, scaling):
    model = _tiny(**MODERN, rope_scaling=scaling)
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        full, _ = model(ids)
        plain = _tiny(**MODERN)
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(full, plain(ids)[0])  # it does change the model
        out, state = model(ids[:, :17])
        rest, _ = model(ids[:, 17:], state)
    assert (torch.cat((out, rest), 1) - full).abs().max() <= 1e-5 * full.abs().max()


def test_rope_scaling_frequencies():
    from samout.models.transformer import rotary_frequencies

    base, _ = rotary_frequencies(16, 10000.0)
    ntk, _ = rotary_frequencies(16, 10000.0, {"type": "ntk", "factor": 4.0})
    assert torch.isclose(ntk[0], base[0]) and torch.isclose(ntk[-1], base[-1] / 4, rtol=1e-9)
    yarn, factor = rotary_frequencies(16, 10000.0, {"type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 4096})
    assert torch.equal(yarn[0], base[0]) and torch.isclose(yarn[-1], base[-1] / 4)
    assert factor == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize("kw, message", [
    (dict(rope_scaling={"type": "ntk", "factor": 2.0}), "needs rotary positions"),
    (dict(positional="rotary", rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling must be"),
    (dict(positional="rotary", rope_scaling={"type": "ntk", "factor": 0}), "positive number"),
    (dict(positional="rotary", rope_scaling={"type": "yarn", "factor": 2.0}), "original_max_position"),
    (dict(positional="rotary", rope_scaling={"type": "ntk", "factor": 2.0, "beta": 1}),
     "unknown rope_scaling"),
    (dict(bias="no"), "bias must be true or false"),
    (dict(norm_type="batchnorm"), "unknown norm_type"),
])
def test_bad_style_options(kw, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**kw)


def test_overfits_a_small_batch_of_real_text(shakespeare_text):
    torch.manual_seed(0)
    data = torch.tensor(list(shakespeare_text[5000:7000].encode("utf-8")), dtype=torch.long)
    batch = data[: 4 * 65].view(4, 65)
    model = Transformer(match_transformer_to(SamOutConfig.from_preset("tiny", vocab_size=256)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):  # converges in ~50 steps
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::15]


@pytest.mark.parametrize("kw", VARIANTS)
def test_logits_to_keep_is_the_tail_of_the_full_logits(seed, kw):
    model = _tiny(**kw)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        full, full_state = model(ids)
        part, state = model(ids, logits_to_keep=1)
        cached, _ = model(ids[:, -3:], model(ids[:, :-3])[1], logits_to_keep=2)
    assert part.shape == (2, 1, VOCAB) and cached.shape == (2, 2, VOCAB)
    scale = float(full.abs().max())
    assert torch.allclose(part, full[:, -1:], rtol=0, atol=1e-6 * scale)
    assert torch.allclose(cached, full[:, -2:], rtol=0, atol=1e-5 * scale)
    for a, b in zip(state.to_tensors().values(), full_state.to_tensors().values()):
        assert torch.equal(a, b)


def test_eval_rope_scaling_flag():
    from samout.commands.eval import apply_rope_scaling, parse_rope_scaling
    from samout.errors import SamoutError

    assert parse_rope_scaling("ntk:4", 256) == {"type": "ntk", "factor": 4.0}
    assert parse_rope_scaling("yarn:2", 256)["original_max_position_embeddings"] == 256
    with pytest.raises(SamoutError, match="expected TYPE:FACTOR"):
        parse_rope_scaling("ntk", 256)
    model = _tiny(**MODERN)
    apply_rope_scaling(model, "ntk:4", 16, "run")
    assert model.config.rope_scaling == {"type": "ntk", "factor": 4.0}
    with pytest.raises(SamoutError, match="needs rotary positions"):
        apply_rope_scaling(_tiny(), "ntk:4", 16, "run")
    with pytest.raises(SamoutError, match="is not a Transformer"):
        apply_rope_scaling(SamOut(SamOutConfig.from_preset("tiny")), "ntk:4", 16, "run")
