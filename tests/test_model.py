"""Model code: reference checkpoints reproduce the golden outputs; invariants; errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kronos_kit.model import Kronos, KronosTokenizer, PredictorCache, check_pair


@pytest.fixture(scope="module")
def tokenizer(reference_dirs):
    return KronosTokenizer.from_pretrained(reference_dirs["tokenizer"])


@pytest.fixture(scope="module")
def predictor(reference_dirs):
    return Kronos.from_pretrained(reference_dirs["predictor"])


def assert_matches(actual: torch.Tensor, expected: np.ndarray, name: str) -> None:
    a = actual.detach().cpu().numpy()
    assert a.shape == expected.shape, f"{name}: shape {a.shape} vs {expected.shape}"
    if np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(a, expected, err_msg=name)
    else:
        # within 1e-5 absolute or relative, whichever is looser for each element
        tol = np.maximum(1e-5, 1e-5 * np.abs(expected))
        assert np.all(np.abs(a - expected) <= tol), f"{name}: max abs err {np.abs(a - expected).max()}"


def tokenizer_outputs(tok, g):
    x = torch.tensor(g["x"])
    with torch.no_grad():
        (z_pre, z), bsq_loss, quantized, _ = tok(x)
        s1, s2 = tok.encode(x, half=True)
        out = {"z_pre": z_pre, "z": z, "bsq_loss_eval": bsq_loss, "quantized": quantized, "s1": s1, "s2": s2,
               "full_idx": tok.encode(x), "decoded": tok.decode([torch.tensor(g["s1"]), torch.tensor(g["s2"])],
                                                              half=True)}
    tok.train()
    torch.manual_seed(11)
    (z_pre, z), bsq_loss, _, _ = tok(x)
    tok.eval()
    out["bsq_loss_train"] = bsq_loss
    out["recon_loss_train"] = F.mse_loss(z_pre, x) + F.mse_loss(z, x)
    return out


def predictor_outputs(pred, g):
    s1, s2, stamp = torch.tensor(g["s1"]), torch.tensor(g["s2"]), torch.tensor(g["stamp"])
    with torch.no_grad():
        # the golden values come from the reference in eval mode, whose s2 path is non-causal
        tf1, tf2 = pred(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=True, s1_targets=s1[:, 1:],
                        causal_s2=False)
        loss, ce1, ce2 = pred.head.compute_loss(tf1, tf2, s1[:, 1:], s2[:, 1:])
        d1, context = pred.decode_s1(s1, s2, stamp)
        return {"tf_s1_logits": tf1, "tf_s2_logits": tf2, "tf_loss": loss, "tf_ce_s1": ce1, "tf_ce_s2": ce2,
                "d1_logits": d1, "d2_logits": pred.decode_s2(context, s1, causal_s2=False),
                "d2_last_logits": pred.decode_s2(context, s1[:, -1:])}


TOKENIZER_KEYS = ["z_pre", "z", "bsq_loss_eval", "quantized", "s1", "s2", "full_idx", "decoded",
                  "bsq_loss_train", "recon_loss_train"]
PREDICTOR_KEYS = ["tf_s1_logits", "tf_s2_logits", "tf_loss", "tf_ce_s1", "tf_ce_s2", "d1_logits", "d2_logits",
                  "d2_last_logits"]


def test_golden_covers_every_model_key(golden):
    model_keys = {k for k in golden if not k.startswith("fc_")} - {"x", "stamp"}
    assert model_keys == set(TOKENIZER_KEYS) | set(PREDICTOR_KEYS)


@pytest.mark.parametrize("key", TOKENIZER_KEYS)
def test_tokenizer_reproduces_reference(tokenizer, golden, key):
    assert_matches(tokenizer_outputs(tokenizer, golden)[key], golden[key], key)


@pytest.mark.parametrize("key", PREDICTOR_KEYS)
def test_predictor_reproduces_reference(predictor, golden, key):
    assert_matches(predictor_outputs(predictor, golden)[key], golden[key], key)


def test_loaded_models_are_in_eval_mode(tokenizer, predictor):
    assert not tokenizer.training and not predictor.training


def test_save_load_round_trip_is_bit_identical(tmp_path, tokenizer, predictor, golden, reference_dirs):
    for model, kind, outputs in ((tokenizer, "tokenizer", tokenizer_outputs),
                                 (predictor, "predictor", predictor_outputs)):
        model.save_pretrained(tmp_path / kind)
        again = type(model).from_pretrained(tmp_path / kind)
        before, after = outputs(model, golden), outputs(again, golden)
        for k in before:
            assert torch.equal(before[k], after[k]), k
        saved = load_file(str(tmp_path / kind / "model.safetensors"))
        ref = load_file(str(reference_dirs[kind] / "model.safetensors"))
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in ref.items()}
        saved_cfg = json.loads((tmp_path / kind / "config.json").read_text())
        assert saved_cfg == json.loads((reference_dirs[kind] / "config.json").read_text())


def test_index_bit_order_and_codes_inverse(tokenizer, golden):
    x = torch.tensor(golden["x"])
    q = tokenizer.quantizer
    with torch.no_grad():
        _, _, quantized, full = tokenizer(x)
        s1, s2 = tokenizer.encode(x, half=True)
    assert torch.equal(full, s1 | (s2 << tokenizer.s1_bits))  # s1 in the low bits
    assert torch.equal(q.indices_to_codes(s1, s2), quantized)
    assert torch.allclose(quantized.norm(dim=-1), torch.ones(1))  # codes on the unit sphere
    assert torch.allclose(tokenizer.decode(full), tokenizer.decode([s1, s2], half=True))


def test_group_entropy_mode_differs_but_reference_is_default(tokenizer, golden):
    x = torch.tensor(golden["x"])
    with torch.no_grad():
        latent = tokenizer._encode_latent(x)
        reference = tokenizer.quantizer(latent).loss
        tokenizer.quantizer.entropy_mode = "group"
        try:
            group = tokenizer.quantizer(latent).loss
        finally:
            tokenizer.quantizer.entropy_mode = "reference"
    assert torch.allclose(reference, torch.tensor(golden["bsq_loss_eval"]), atol=1e-6)
    assert not torch.allclose(reference, group, atol=1e-6)


def test_straight_through_gradient_reaches_encoder(tokenizer, golden):
    tok = KronosTokenizer.from_config(dict(tokenizer.config))
    tok.load_state_dict(tokenizer.state_dict())
    (z_pre, z), bsq_loss, _, _ = tok(torch.tensor(golden["x"]))
    (F.mse_loss(z, torch.tensor(golden["x"])) + bsq_loss).backward()
    assert tok.embed.weight.grad is not None and tok.embed.weight.grad.abs().sum() > 0


def _logits_with_changed_input(pred, golden, t, *, causal_s2):
    s1, s2, stamp = torch.tensor(golden["s1"]), torch.tensor(golden["s2"]), torch.tensor(golden["stamp"])
    inp1, inp2, targets1, targets2 = s1[:, :-1], s2[:, :-1], s1[:, 1:], s2[:, 1:]
    changed = inp1.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % pred.s1_vocab_size  # the s1 token at position t+1
    outs = []
    with torch.no_grad():
        for tokens in (inp1, changed):
            l1, l2 = pred(tokens, inp2, stamp[:, :-1], use_teacher_forcing=True, s1_targets=targets1,
                          causal_s2=causal_s2)
            ce1 = F.cross_entropy(l1[0], targets1[0], reduction="none")
            ce2 = F.cross_entropy(l2[0], targets2[0], reduction="none")
            outs.append((ce1, ce2))
    return outs


def test_validation_path_does_not_leak(predictor, golden):
    t = 30
    (ce1, ce2), (ce1_changed, ce2_changed) = _logits_with_changed_input(predictor, golden, t, causal_s2=True)
    assert torch.equal(ce1[: t + 1], ce1_changed[: t + 1])
    assert torch.allclose(ce2[: t + 1], ce2_changed[: t + 1], atol=1e-6)
    assert not torch.allclose(ce1[t + 1 :], ce1_changed[t + 1 :])  # the change itself is visible later


def test_reference_eval_path_leaks(predictor, golden):
    # the switch reproduces the reference's non-causal eval: earlier s2 losses see the future
    t = 30
    (_, ce2), (_, ce2_changed) = _logits_with_changed_input(predictor, golden, t, causal_s2=False)
    assert not torch.allclose(ce2[: t + 1], ce2_changed[: t + 1], atol=1e-6)


def test_kv_cache_matches_full_forward(predictor, golden):
    s1, s2, stamp = torch.tensor(golden["s1"]), torch.tensor(golden["s2"]), torch.tensor(golden["stamp"])
    with torch.no_grad():
        full, _ = predictor.decode_s1(s1, s2, stamp)
        cache = PredictorCache.empty(predictor.n_layers)
        first, _ = predictor.decode_s1(s1[:, :40], s2[:, :40], stamp[:, :40], cache=cache)
        chunk, _ = predictor.decode_s1(s1[:, 40:50], s2[:, 40:50], stamp[:, 40:50], cache=cache)
        steps = [predictor.decode_s1(s1[:, i : i + 1], s2[:, i : i + 1], stamp[:, i : i + 1], cache=cache)[0]
                 for i in range(50, 64)]
    incremental = torch.cat([first, chunk, *steps], dim=1)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)
    assert cache.length == 64


def test_rotary_follows_dtype(predictor, golden):
    s1, s2, stamp = torch.tensor(golden["s1"]), torch.tensor(golden["s2"]), torch.tensor(golden["stamp"])
    p64 = Kronos.from_config(dict(predictor.config))
    p64.load_state_dict(predictor.state_dict())
    p64 = p64.double().eval()
    with torch.no_grad():
        ref, _ = predictor.decode_s1(s1, s2, stamp)
        out, _ = p64.decode_s1(s1, s2, stamp)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cls,name,count",
    [(Kronos, "mini", 4_108_032), (Kronos, "small", 24_741_376), (Kronos, "base", 102_310_592),
     (KronosTokenizer, "tokenizer-base", 3_958_042), (KronosTokenizer, "tokenizer-2k", 3_958_042)],
)
def test_preset_parameter_counts(cls, name, count):
    model = cls.from_preset(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_presets_are_seeded_and_usable_as_sources():
    a, b = Kronos.from_pretrained("tiny"), Kronos.from_pretrained("preset:tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = Kronos.from_pretrained("tiny", seed=1)
    assert not torch.equal(a.head.proj_s1.weight, c.head.proj_s1.weight)
    check_pair(KronosTokenizer.from_pretrained("tiny"), a)


def test_pairing_mismatched_bits_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"\(s1_bits, s2_bits\)"):
        check_pair(tokenizer, Kronos.from_preset("tiny"))


def test_wrong_input_shapes_name_the_tensor(tokenizer, predictor):
    with pytest.raises(ValueError, match="tokenizer input x has shape"):
        tokenizer.encode(torch.zeros(1, 10, 5))
    with pytest.raises(ValueError, match="stamp has shape"):
        predictor.decode_s1(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long),
                            torch.zeros(1, 8, 4))
    with pytest.raises(ValueError, match="s1_ids"):
        predictor.decode_s1(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))


def test_config_and_state_mismatch_name_the_key(tmp_path, reference_dirs):
    bad = tmp_path / "bad_config"
    bad.mkdir()
    cfg = json.loads((reference_dirs["predictor"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "n_kv_heads": 2}))
    with pytest.raises(ValueError, match="n_kv_heads"):
        Kronos.from_pretrained(bad)
    shape = tmp_path / "bad_shape"
    shape.mkdir()
    (shape / "config.json").write_text(json.dumps({**cfg, "ff_dim": 48}))
    (shape / "model.safetensors").write_bytes((reference_dirs["predictor"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"transformer\.0\.ffn\.w1\.weight"):
        Kronos.from_pretrained(shape)
    with pytest.raises(ValueError, match="neither an existing folder"):
        Kronos.from_pretrained("no-such-preset")


def test_hub_id_goes_through_huggingface_hub(monkeypatch, reference_dirs):
    import huggingface_hub

    calls = {}

    def fake_snapshot_download(repo_id, **kwargs):
        calls.update(repo_id=repo_id, **kwargs)
        return str(reference_dirs["predictor"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = Kronos.from_pretrained("NeoQuasar/Kronos-small", revision="v1", local_files_only=True)
    assert calls["repo_id"] == "NeoQuasar/Kronos-small" and calls["revision"] == "v1"
    assert calls["local_files_only"] is True
    assert not model.training
