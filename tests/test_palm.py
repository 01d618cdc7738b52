import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf import model as palm_module
from palm_rlhf.generate import top_k_top_p_filter
from palm_rlhf.model import attention_mask
from palm_rlhf.tokenizer import EOS_ID, PAD_ID, ByteTokenizer


def tiny(**overrides):
    torch.manual_seed(0)
    return PaLM.from_config(PaLMConfig.from_name("tiny", **overrides))


@pytest.fixture
def palm():
    return tiny()


def test_logits_shape_and_loss_is_next_token_cross_entropy(palm):
    x = torch.randint(0, 256, (2, 10))
    logits = palm(x)
    assert logits.shape == (2, 10, palm.num_tokens)
    expected = torch.nn.functional.cross_entropy(palm(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(palm(x, return_loss=True), expected)


def test_loss_ignores_pad_targets(palm):
    x = torch.randint(0, 256, (1, 10))
    padded = torch.cat((x, torch.full((1, 4), PAD_ID)), dim=1)
    torch.testing.assert_close(palm(padded, return_loss=True), palm(x, return_loss=True))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_causal_a_future_token_never_changes_past_logits(palm, backend):
    palm.attn_backend = backend
    x = torch.randint(0, 256, (1, 12))
    changed = x.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 256
    torch.testing.assert_close(palm(x)[:, :7], palm(changed)[:, :7])
    assert not torch.allclose(palm(x)[:, 7:], palm(changed)[:, 7:])


@pytest.mark.parametrize("xpos", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_equals_math_values_and_gradients(xpos, padded):
    palm = tiny(rotary_xpos=xpos).double()  # float64 so that the comparison can be tight
    x = torch.randint(0, 256, (3, 16))
    mask = None
    if padded:
        mask = torch.ones(3, 16, dtype=torch.bool)
        mask[0, :5] = False  # left padding
        mask[1, 11:] = False  # right padding
    results = {}
    for backend in ("math", "sdpa"):
        palm.zero_grad()
        palm.attn_backend = backend
        logits = palm(x, mask=mask)
        (logits * mask[..., None] if padded else logits).sum().backward()
        results[backend] = (logits.detach(), [p.grad.clone() for p in palm.parameters()])
    torch.testing.assert_close(results["math"][0], results["sdpa"][0], atol=1e-10, rtol=1e-9)
    for g_math, g_sdpa in zip(results["math"][1], results["sdpa"][1]):
        torch.testing.assert_close(g_math, g_sdpa, atol=1e-10, rtol=1e-9)


def test_padding_does_not_change_real_tokens_logits(palm):
    x = torch.randint(0, 256, (1, 9))
    padded = torch.cat((torch.full((1, 4), PAD_ID), x), dim=1)
    mask = padded != PAD_ID
    torch.testing.assert_close(palm(padded, mask=mask)[:, 4:], palm(x), atol=1e-5, rtol=1e-4)


def test_attention_mask_rows_are_never_empty():
    key_mask = torch.tensor([[False, False, True, True]])
    mask = attention_mask(key_mask, 4)
    assert mask.any(dim=-1).all()
    assert mask[0, 0, 3].tolist() == [False, False, True, True]  # the last query sees only real keys


def test_cached_greedy_generation_equals_uncached(palm):
    prompt = torch.randint(0, 256, (3, 6))
    cached = palm.generate(40, prompt=prompt, temperature=0.0)
    uncached = palm.generate(40, prompt=prompt, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 34)
    assert torch.equal(cached, uncached)


def test_batched_prompts_of_different_lengths_equal_one_by_one(palm):
    prompts = [torch.randint(0, 256, (n,)) for n in (2, 9, 5)]
    batched = palm.generate(25, prompt=prompts, temperature=0.0)
    num_new = 25 - max(len(p) for p in prompts)
    for row, prompt in zip(batched, prompts):
        alone = palm.generate(len(prompt) + num_new, prompt=prompt, temperature=0.0)
        assert torch.equal(alone, row)


def test_generation_stops_at_eos_per_sequence_and_pads_after(palm):
    prompt = torch.tensor([[97, 97], [98, 98]])
    free = palm.generate(12, prompt=prompt, temperature=0.0)
    eos = int(free[0, 3])  # the greedy 4th token of row 0 plays EOS: row 0 must stop there
    out = palm.generate(12, prompt=prompt, temperature=0.0, eos_token=eos)
    first_eos = (free[0] == eos).nonzero()[0, 0]
    assert torch.equal(out[0, : first_eos + 1], free[0, : first_eos + 1])
    assert (out[0, first_eos + 1 :] == PAD_ID).all()
    row1_eos = (free[1] == eos).nonzero()
    row1_stop = int(row1_eos[0, 0]) + 1 if len(row1_eos) else free.shape[1]
    assert torch.equal(out[1, :row1_stop], free[1, :row1_stop])  # the other row goes on


def test_returned_log_probs_match_a_forward_pass_at_the_sampling_temperature(palm):
    prompt = torch.randint(0, 256, (2, 4))
    tokens, log_probs = palm.generate(20, prompt=prompt, temperature=0.7, return_log_probs=True)
    seq = torch.cat((prompt, tokens), dim=1)
    expected = palm.log_probs(seq, temperature=0.7)[:, 3:]
    torch.testing.assert_close(log_probs, expected.detach(), atol=1e-5, rtol=1e-4)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(top_k_top_p_filter(logits, 2, None)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert torch.isinf(top_k_top_p_filter(logits, None, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_k_top_p_filter(logits, None, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(top_k_top_p_filter(logits, None, 0.0)).tolist() == [[False, True, True, True]]


def test_top_p_zero_keeps_the_most_likely_token(palm):
    prompt = torch.randint(0, 256, (2, 3))
    torch.testing.assert_close(palm.generate(10, prompt=prompt, top_p=0.0), palm.generate(10, prompt=prompt, temperature=0.0))


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_right_padded_prompt_mask_samples_as_the_left_padded_prompt(palm, use_cache):
    prompts = [torch.tensor([104, 105]), torch.tensor([97, 98, 99, 100, 101])]
    right = torch.full((2, 5), PAD_ID)
    right[0, :2], right[1] = prompts[0], prompts[1]
    right_mask = right != PAD_ID
    expected = palm.generate(12, prompt=prompts, temperature=0.0, use_cache=use_cache, return_log_probs=True)
    got = palm.generate(12, prompt=right, prompt_mask=right_mask, temperature=0.0, use_cache=use_cache,
                        return_log_probs=True)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_sampling_is_reproducible_with_a_generator(palm):
    prompt = torch.randint(0, 256, (2, 3))
    a = palm.generate(20, prompt=prompt, generator=torch.Generator().manual_seed(1), top_p=0.9)
    b = palm.generate(20, prompt=prompt, generator=torch.Generator().manual_seed(1), top_p=0.9)
    assert torch.equal(a, b)


# tokens and log-prob sums that generate gave before the decoding loop was optimised, per setting:
# a faster sampler must draw exactly the same tokens from the same generator
PINNED_SAMPLES = [
    (dict(), dict(temperature=0.0),
     [[172, 22, 1, 172, 22, 1, 241, 241, 241, 241], [47, 226, 186, 186, 186, 186, 186, 186, 186, 186],
      [67, 87, 87, 173, 214, 186, 186, 186, 186, 186]], [-17.6981, -18.2903, -14.5366]),
    (dict(), dict(temperature=1.0),
     [[22, 31, 48, 47, 58, 229, 151, 218, 203, 198], [152, 8, 8, 173, 8, 220, 46, 141, 117, 216],
      [87, 67, 176, 57, 47, 112, 22, 150, 150, 11]], [-40.2144, -34.4120, -33.1096]),
    (dict(), dict(temperature=0.7, top_k=5, eos_token=47),
     [[22, 22, 202, 47] + [PAD_ID] * 6, [47] + [PAD_ID] * 9, [87, 87, 47] + [PAD_ID] * 7], [-7.8068, -0.4683, -6.2527]),
    (dict(), dict(temperature=1.0, top_p=0.8),
     [[22, 31, 48, 47, 58, 229, 151, 178, 7, 45], [152, 8, 8, 173, 8, 8, 46, 141, 117, 117],
      [87, 67, 78, 186, 186, 112, 112, 186, 67, 27]], [-36.2443, -29.4970, -28.7804]),
    (dict(rotary_xpos=True), dict(temperature=1.0),
     [[22, 31, 48, 47, 58, 229, 151, 218, 203, 198], [152, 8, 8, 173, 8, 220, 46, 141, 117, 216],
      [87, 67, 176, 57, 47, 112, 22, 150, 150, 11]], [-40.2179, -34.4191, -33.1061]),
]


@pytest.mark.parametrize("model_overrides, sampling, expected_tokens, expected_log_prob_sums", PINNED_SAMPLES)
def test_cached_sampling_draws_the_pinned_tokens(model_overrides, sampling, expected_tokens, expected_log_prob_sums):
    palm = tiny(tie_embedding=False, **model_overrides)
    with torch.no_grad():
        palm.to_logits.weight *= 4  # peaked distributions, so top-k and top-p bite
    prompts = [torch.tensor([104, 105]), torch.tensor([97, 98, 99, 100, 101]), torch.tensor([120])]  # left-padded
    tokens, log_probs = palm.generate(15, prompt=prompts, generator=torch.Generator().manual_seed(3),
                                      return_log_probs=True, **sampling)
    assert tokens.tolist() == expected_tokens
    torch.testing.assert_close(log_probs.sum(dim=1), torch.tensor(expected_log_prob_sums), atol=1e-3, rtol=0)


def test_generated_tensors_can_enter_a_loss(palm):
    """generate samples under inference mode; what it returns must still be usable by autograd."""
    prompt = torch.randint(0, 256, (2, 4))
    tokens, log_probs = palm.generate(12, prompt=prompt, return_log_probs=True)
    assert not tokens.is_inference() and not log_probs.is_inference()
    loss = palm(torch.cat((prompt, tokens), dim=1), return_loss=True) + log_probs.sum() * 0
    loss.backward()
    assert palm.token_emb.weight.grad is not None


def test_out_of_range_token_ids_give_a_clear_error(palm):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 258\)"):
        palm(torch.tensor([[1, 2, 258]]))
    with pytest.raises(ValueError, match="must be in"):
        palm(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        palm(torch.rand(1, 3))


def test_generate_rejects_a_seq_len_shorter_than_the_prompt(palm):
    with pytest.raises(ValueError, match="must exceed the prompt length"):
        palm.generate(4, prompt=torch.randint(0, 256, (1, 6)))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        PaLMConfig.from_name("huge-ish")


def test_save_load_round_trips_bit_for_bit(tmp_path, palm):
    palm.add_finetune_params("actor", lora_r=4)
    with torch.no_grad():
        for p in palm.finetune_parameters("actor"):
            p.normal_()
    palm.save(tmp_path / "ckpt")
    loaded = PaLM.from_pretrained(tmp_path / "ckpt")
    mine, theirs = palm.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(palm(x, finetune_scope="actor"), loaded(x, finetune_scope="actor"))
    assert loaded.to_logits.weight is loaded.token_emb.weight  # tying survives the round trip


def test_a_gathered_state_dict_with_the_tied_embedding_copied_saves_it_once(tmp_path, palm):
    # a full state dict gathered from FSDP2 shards holds the tied embedding under both names, as
    # two tensors: saved as they are, from_pretrained would reject the second name
    copies = {k: v.clone() for k, v in palm.state_dict().items()}
    assert copies["to_logits.weight"].data_ptr() != copies["token_emb.weight"].data_ptr()
    palm.save(tmp_path / "ckpt", state_dict=copies)
    loaded = PaLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.to_logits.weight is loaded.token_emb.weight
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in copies.items())


def test_save_to_a_single_file_carries_its_config(tmp_path, palm):
    palm.save(tmp_path / "palm.safetensors")
    loaded = PaLM.from_pretrained(tmp_path / "palm.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(palm.state_dict().values(), loaded.state_dict().values()))


def test_loading_a_mismatched_checkpoint_names_the_mismatch(tmp_path, palm):
    palm.save(tmp_path / "ckpt")
    other = PaLM.from_config(PaLMConfig.from_name("tiny", dim=32))
    with pytest.raises(ValueError, match="dim: checkpoint 64, model 32"):
        other.load(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        other.load(tmp_path / "missing")


def test_tiny_model_learns_a_repeated_pattern():
    palm = tiny()
    pattern = ByteTokenizer().encode("abcabdabe" * 8)[None]
    optimizer = torch.optim.AdamW(palm.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = palm(pattern, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_flash_attn_without_cuda_falls_back_quietly(recwarn, monkeypatch):
    import palm_rlhf.model as palm_module

    monkeypatch.setattr(palm_module, "_warned_flash_fallback", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    first = PaLM.from_config(PaLMConfig.from_name("tiny", flash_attn=True))
    assert first.attn_backend == "sdpa"
    assert not any("flash" in str(w.message) for w in recwarn)  # nothing a CPU user could act on
    first(torch.randint(0, 256, (1, 5)))


def test_flash_attn_on_cuda_without_the_package_says_so_once(recwarn, monkeypatch):
    import palm_rlhf.model as palm_module

    monkeypatch.setattr(palm_module, "_warned_flash_fallback", False)
    monkeypatch.setattr(palm_module, "flash_attn_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert palm_module.resolve_attn_backend(True) == "sdpa"
    assert palm_module.resolve_attn_backend(True) == "sdpa"
    assert sum("flash-attn package is not installed" in str(w.message) for w in recwarn) == 1


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_under_bf16_autocast_attention_gets_q_k_v_of_one_dtype(palm, backend, monkeypatch):
    # fp32 rotary tables used to promote q and k to fp32 beside a bf16 v, which flash-attn refuses
    seen = []

    def recording(attend):
        def wrapper(q, k, v, *args):
            seen.append((q.dtype, k.dtype, v.dtype))
            return attend(q, k, v, *args)
        return wrapper

    for name, attend in palm_module.ATTEND.items():
        monkeypatch.setitem(palm_module.ATTEND, name, recording(attend))
    monkeypatch.setattr(palm_module, "attend_one_query", recording(palm_module.attend_one_query))
    palm.attn_backend = backend
    x = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        palm(x)
        palm(x, mask=mask)
        palm.generate(12, prompt=x, prompt_mask=mask)  # the KV cache: a prefill, then one-query steps
    assert len(seen) == palm.config.depth * (2 + 4) and set(seen) == {(torch.bfloat16,) * 3}


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="needs oneDNN's bf16 kernels")
@pytest.mark.parametrize("scope", [None, "lora", "last_layer"])
def test_bf16_decoding_weights_sample_bitwise_what_nn_linear_samples(scope, monkeypatch):
    from palm_rlhf import generate as generate_module

    palm = tiny()
    palm.add_finetune_params("lora", lora_r=4)
    palm.add_finetune_params("last_layer", last_n_layers=1)
    with torch.no_grad():
        for name, weight in palm.named_parameters():
            if name.endswith(".B"):
                weight.normal_(std=0.1)  # adapters that change the samples
    palm = palm.to(torch.bfloat16)
    prompts = [torch.tensor([104, 105]), torch.tensor([97, 98, 99, 100, 101])]  # left-padded
    packed_calls = []
    linear = generate_module.DecodingWeights.linear
    monkeypatch.setattr(generate_module.DecodingWeights, "linear",
                        lambda self, module, x: packed_calls.append(module) or linear(self, module, x))

    def sample():
        return palm.generate(20, prompt=prompts, generator=torch.Generator().manual_seed(2), return_log_probs=True,
                             num_samples_per_prompt=3, finetune_scope=scope)

    packed = sample()
    assert len(packed_calls) > 0
    assert not generate_module.DecodingWeights.suit(tiny())  # fp32 weights keep nn.Linear
    monkeypatch.setattr(generate_module.DecodingWeights, "suit", staticmethod(lambda model: False))
    plain = sample()
    assert torch.equal(packed[0], plain[0]) and torch.equal(packed[1], plain[1])
