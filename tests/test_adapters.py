"""Finetune strategies on the model side: parameter groups, LoRA (merge, save, load), L2-SP."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from kronos_kit.forecast import generate_tokens
from kronos_kit.model import (
    L2SP,
    LORA_TARGETS,
    Kronos,
    KronosTokenizer,
    LoRALinear,
    PredictorCache,
    apply_lora,
    load_adapter,
    lora_config,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    parameter_groups,
    save_adapter,
    save_merged,
    select_trainable,
    set_trainable,
    state_dict_hash,
    trainable_table,
    weights_hash,
)

PREDICTOR_GROUPS = ["embedding", "time_embedding", "layers.0", "layers.1", "norm", "dependency", "head"]
TOKENIZER_GROUPS = ["embed", "encoder", "quantizer", "decoder", "head"]


def predictor_batch(model: Kronos, *, seed: int = 0, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randint(0, 2**model.s1_bits, (batch, length + 1), generator=g)
    s2 = torch.randint(0, 2**model.s2_bits, (batch, length + 1), generator=g)
    stamp = torch.stack([torch.randint(0, n, (batch, length + 1), generator=g) for n in (60, 24, 7, 32, 13)], -1)
    return {"s1": s1, "s2": s2, "stamp": stamp.float()}


def predictor_logits(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced (s1, s2) logits: deterministic, every layer used."""
    return model(b["s1"][:, :-1], b["s2"][:, :-1], b["stamp"][:, :-1], use_teacher_forcing=True,
                 s1_targets=b["s1"][:, 1:])


def predictor_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    s1_logits, s2_logits = predictor_logits(model, b)
    return F.cross_entropy(s1_logits.flatten(0, 1), b["s1"][:, 1:].flatten()) + F.cross_entropy(
        s2_logits.flatten(0, 1), b["s2"][:, 1:].flatten())


def tokenizer_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    (z_pre, z), bsq_loss, _, _ = model(x)
    return F.mse_loss(z_pre, x) + F.mse_loss(z, x) + bsq_loss


def train_steps(model: nn.Module, loss_fn, steps: int = 3) -> None:
    """AdamW with weight decay over the trainable parameters, as the engine builds it."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        optimizer.step()
    model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".lora_a", ".lora_b")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def predictor() -> Kronos:
    return Kronos.from_pretrained("tiny", seed=0)


@pytest.fixture
def tokenizer() -> KronosTokenizer:
    return KronosTokenizer.from_pretrained("tiny", seed=0)


# ---------------------------------------------------------------------------------------------
# parameter groups


def assert_partition(model: nn.Module, expected: list[str]) -> None:
    groups = parameter_groups(model)
    assert list(groups) == expected
    names = [n for members in groups.values() for n in members]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()), "every parameter in a group"
    assert len(names) == len(set(names)), "no parameter in two groups"
    assert all(groups.values()), "no empty group"


@pytest.mark.parametrize("source", ["tiny", "reference"])
def test_groups_partition_the_predictor(source, reference_dirs):
    model = Kronos.from_pretrained(reference_dirs["predictor"] if source == "reference" else source)
    assert_partition(model, PREDICTOR_GROUPS)
    groups = parameter_groups(model)
    assert groups["norm"] == ["norm.weight"]
    assert all(n.startswith("transformer.1.") for n in groups["layers.1"])
    assert all(n.startswith("dep_layer.") for n in groups["dependency"])
    apply_lora(model, rank=2, alpha=4)
    assert_partition(model, PREDICTOR_GROUPS)  # adapters join the group of the linear they adapt
    assert "transformer.0.self_attn.q_proj.lora_a" in parameter_groups(model)["layers.0"]


@pytest.mark.parametrize("source", ["tiny", "reference"])
def test_groups_partition_the_tokenizer(source, reference_dirs):
    model = KronosTokenizer.from_pretrained(reference_dirs["tokenizer"] if source == "reference" else source)
    assert_partition(model, TOKENIZER_GROUPS)
    assert sorted(parameter_groups(model)["quantizer"]) == sorted(
        f"{m}.{p}" for m in ("quant_embed", "post_quant_embed_pre", "post_quant_embed") for p in ("weight", "bias"))


def test_selectors_last_n_all_norms_and_errors(predictor, tokenizer):
    groups = parameter_groups(predictor)
    assert select_trainable(predictor, ["last:1"]) == groups["layers.1"]
    assert select_trainable(predictor, ["last:2", "head"]) == groups["layers.0"] + groups["layers.1"] + groups["head"]
    assert select_trainable(predictor, ["all"]) == [n for n, _ in predictor.named_parameters()]
    assert select_trainable(predictor, ["all_norms"]) == [
        "transformer.0.norm1.weight", "transformer.0.norm2.weight", "transformer.1.norm1.weight",
        "transformer.1.norm2.weight", "norm.weight", "dep_layer.norm.weight"]
    with pytest.raises(ValueError, match=r"unknown parameter group 'heads'.*'dependency'.*last:N"):
        select_trainable(predictor, ["heads"])
    for bad in ("last:0", "last:3", "last:x"):
        with pytest.raises(ValueError, match="from 1 to the 2 transformer layers"):
            select_trainable(predictor, [bad])
    with pytest.raises(ValueError, match=r"picks predictor transformer layers; a KronosTokenizer has"):
        select_trainable(tokenizer, ["last:1"])
    with pytest.raises(ValueError, match="non-empty list"):
        select_trainable(predictor, "head")


def test_fixed_time_tables_are_never_made_trainable():
    config = {**Kronos.from_pretrained("tiny").config, "learn_te": False}
    model = Kronos.from_config(config)
    assert select_trainable(model, ["all"]) == [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="select no trainable parameter"):
        set_trainable(model, ["time_embedding"])


@pytest.mark.parametrize("selectors", [["head", "dependency", "norm"], ["last:1"], ["embedding", "time_embedding"]])
def test_set_trainable_trains_only_the_chosen_groups(predictor, selectors):
    chosen = set_trainable(predictor, selectors)
    assert {n for n, p in predictor.named_parameters() if p.requires_grad} == set(chosen)
    before = snapshot(predictor)
    b = predictor_batch(predictor)
    train_steps(predictor, lambda m: predictor_loss(m, b))
    after = predictor.state_dict()
    for name, p in predictor.named_parameters():
        if name in chosen:
            assert not torch.equal(after[name], before[name]), f"{name} was chosen but did not train"
        else:
            assert p.grad is None and torch.equal(after[name], before[name]), f"{name} changed while frozen"


def test_set_trainable_on_the_tokenizer(tokenizer):
    chosen = set_trainable(tokenizer, ["decoder", "head"])
    before = snapshot(tokenizer)
    x = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(0))
    train_steps(tokenizer, lambda m: tokenizer_loss(m, x))
    changed = {k for k, v in tokenizer.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(chosen)
    assert all(n.startswith(("decoder.", "head.")) for n in chosen)


def test_trainable_table_counts(predictor):
    set_trainable(predictor, ["head", "last:1"])
    table = trainable_table(predictor).set_index("group")
    assert list(table.columns) == ["parameters", "trainable parameters", "share"]
    total = sum(p.numel() for p in predictor.parameters())
    assert table.loc["total", "parameters"] == total == table["parameters"].drop("total").sum()
    assert table.loc["head", "parameters"] == table.loc["head", "trainable parameters"] == 2 * (64 * 64 + 64)
    assert table.loc["layers.0", "trainable parameters"] == 0
    trained = sum(p.numel() for p in predictor.parameters() if p.requires_grad)
    assert table.loc["total", "trainable parameters"] == trained
    assert table.loc["total", "share"] == pytest.approx(trained / total)


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_linear_math():
    base = nn.Linear(5, 3)
    lora = LoRALinear(base, rank=2, alpha=6.0, dropout=0.0)
    assert lora.weight is base.weight and not lora.weight.requires_grad and lora.scale == 3.0
    assert lora.lora_a.shape == (2, 5) and lora.lora_b.shape == (3, 2) and not torch.all(lora.lora_a == 0)
    x = torch.randn(4, 5)
    assert torch.equal(lora(x), base(x))  # B = 0
    with torch.no_grad():
        lora.lora_b.normal_()
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ lora.lora_a.T @ lora.lora_b.T)
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.merge()(x), lora(x))


def test_apply_lora_wraps_targets_and_freezes_the_rest(predictor):
    count = apply_lora(predictor, rank=4, alpha=8, targets=["q_proj", "v_proj", "w2"])
    modules = {n for n, m in predictor.named_modules() if isinstance(m, LoRALinear)}
    assert modules == {f"transformer.{i}.{p}" for i in range(2)
                       for p in ("self_attn.q_proj", "self_attn.v_proj", "ffn.w2")}
    # q, v: (4, 64) + (64, 4); w2: (4, 128) + (64, 4)
    assert count == 2 * (2 * (4 * 64 + 64 * 4) + (4 * 128 + 64 * 4))
    assert {n for n, p in predictor.named_parameters() if p.requires_grad} == {
        n for n, _ in predictor.named_parameters() if n.endswith((".lora_a", ".lora_b"))}
    assert lora_config(predictor) == {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "w2"]}
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(predictor, rank=4, alpha=8)


def test_apply_lora_default_targets_every_block_linear(tokenizer):
    apply_lora(tokenizer, rank=2, alpha=2)
    wrapped = [n for n, m in tokenizer.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == (2 + 2) * len(LORA_TARGETS)  # 2 encoder + 2 decoder blocks
    assert lora_config(tokenizer)["targets"] == list(LORA_TARGETS)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0, "alpha": 1}, "rank"), ({"rank": 2, "alpha": 0}, "alpha"),
    ({"rank": 2, "alpha": 1, "dropout": 1.0}, "dropout"), ({"rank": 2, "alpha": 1, "targets": ["wq"]}, "targets"),
])
def test_apply_lora_rejects_bad_settings(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(predictor, **kwargs)


def test_lora_starts_as_the_base_model(predictor):
    b = predictor_batch(predictor)
    with torch.no_grad():
        base = predictor_logits(predictor, b)
        apply_lora(predictor, rank=4, alpha=8)
        adapted = predictor_logits(predictor, b)
    assert torch.equal(adapted[0], base[0]) and torch.equal(adapted[1], base[1])


def test_merged_checkpoint_is_base_plus_scaled_ba(tmp_path, predictor):
    base_state = snapshot(predictor)
    apply_lora(predictor, rank=4, alpha=8)
    randomize_adapters(predictor)
    folder = save_merged(predictor, tmp_path / "merged")
    saved = load_file(str(folder / "model.safetensors"))
    assert sorted(saved) == sorted(base_state)
    assert list(merged_state_dict(predictor)) == list(base_state)  # the reference layout, same order
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base_state.items()}
    merged = {f"{name}.weight" for name, m in predictor.named_modules() if isinstance(m, LoRALinear)}
    assert len(merged) == 2 * len(LORA_TARGETS)
    for name, tensor in saved.items():
        if name in merged:
            m = predictor.get_submodule(name.removesuffix(".weight"))
            assert torch.equal(tensor, base_state[name] + m.scale * (m.lora_b @ m.lora_a)), name
            assert not torch.equal(tensor, base_state[name])
        else:
            assert torch.equal(tensor, base_state[name]), name
    assert json.loads((folder / "config.json").read_text()) == predictor.config


def test_merged_folder_loads_and_reproduces_the_lora_model(tmp_path, predictor):
    apply_lora(predictor, rank=4, alpha=8)
    randomize_adapters(predictor)
    predictor.eval()
    folder = save_merged(predictor, tmp_path / "merged")
    assert (folder / "adapter.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    loaded = Kronos.from_pretrained(folder)
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    b = predictor_batch(predictor)
    with torch.no_grad():
        for got, want in zip(predictor_logits(loaded, b), predictor_logits(predictor, b)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the KV-cached generation path: chunked decode with a cache equals the merged model's full pass
        cache = PredictorCache.empty(predictor.n_layers)
        first, context = predictor.decode_s1(b["s1"][:, :8], b["s2"][:, :8], b["stamp"][:, :8], cache=cache)
        predictor.extend_s2_cache(context, cache)
        rest, context = predictor.decode_s1(b["s1"][:, 8:], b["s2"][:, 8:], b["stamp"][:, 8:], cache=cache)
        predictor.extend_s2_cache(context, cache)
        full, full_context = loaded.decode_s1(b["s1"], b["s2"], b["stamp"])
        torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
        s2_step = predictor.decode_s2_step(context[:, -1:], b["s1"][:, -1], cache)
        s2_full = loaded.decode_s2(full_context, b["s1"][:, -1:])[:, -1]
        torch.testing.assert_close(s2_step, s2_full, rtol=1e-5, atol=1e-5)


def test_generation_with_lora_cached_equals_uncached(predictor):
    apply_lora(predictor, rank=4, alpha=8)
    randomize_adapters(predictor)
    predictor.eval()
    b = predictor_batch(predictor, length=16)
    runs = [generate_tokens(predictor, b["s1"][:, :10], b["s2"][:, :10], b["stamp"][:, :14], 4, max_context=12,
                            sample_count=3, use_cache=use_cache, generator=torch.Generator().manual_seed(5))
            for use_cache in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_merge_lora_in_place_restores_plain_linears(predictor):
    apply_lora(predictor, rank=4, alpha=8)
    randomize_adapters(predictor)
    predictor.eval()
    expected_state = merged_state_dict(predictor)
    b = predictor_batch(predictor)
    with torch.no_grad():
        expected = predictor_logits(predictor, b)
    assert merge_lora(predictor) == 2 * len(LORA_TARGETS)
    assert not any(isinstance(m, LoRALinear) for m in predictor.modules())
    state = predictor.state_dict()
    assert list(state) == list(expected_state) and all(torch.equal(state[k], expected_state[k]) for k in state)
    with torch.no_grad():
        for got, want in zip(predictor_logits(predictor, b), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_checkpoint_merged_layout(tmp_path, reference_dirs):
    model = Kronos.from_pretrained(reference_dirs["predictor"])
    reference = load_file(str(reference_dirs["predictor"] / "model.safetensors"))
    apply_lora(model, rank=2, alpha=4)
    randomize_adapters(model)
    save_merged(model, tmp_path / "merged")
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    tok = KronosTokenizer.from_pretrained(reference_dirs["tokenizer"])
    apply_lora(tok, rank=2, alpha=4, targets=["w1", "w3"])
    randomize_adapters(tok)
    save_merged(tok, tmp_path / "tok")
    x = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(KronosTokenizer.from_pretrained(tmp_path / "tok")(x).reconstructions[1],
                                   tok(x).reconstructions[1], rtol=1e-5, atol=1e-5)


def test_lora_training_changes_only_the_adapters(predictor):
    base_hash = weights_hash(predictor)
    apply_lora(predictor, rank=4, alpha=8, dropout=0.1)
    before = snapshot(predictor)
    b = predictor_batch(predictor)
    train_steps(predictor, lambda m: predictor_loss(m, b))
    after = predictor.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if k.endswith((".lora_a", ".lora_b"))}
    base_part = {k: v for k, v in after.items() if not k.endswith((".lora_a", ".lora_b"))}
    assert weights_hash(predictor) != base_hash
    assert state_dict_hash(base_part) == base_hash  # the frozen base is bit-identical


def test_adapter_save_load_round_trip(tmp_path, predictor):
    base = copy.deepcopy(predictor)
    apply_lora(predictor, rank=4, alpha=8, targets=["k_proj", "out_proj", "w1"])
    b = predictor_batch(predictor)
    train_steps(predictor, lambda m: predictor_loss(m, b))
    save_adapter(predictor, tmp_path / "adapter", extra={"base": "tiny"})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_sha256"] == weights_hash(base) and config["extra"] == {"base": "tiny"}
    rng = torch.get_rng_state()
    load_adapter(base, tmp_path / "adapter")
    assert torch.equal(torch.get_rng_state(), rng), "loading must not draw from the global RNG"
    assert lora_config(base) == lora_config(predictor)
    got, want = lora_state_dict(base), lora_state_dict(predictor)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got)
    with torch.no_grad():
        for x, y in zip(predictor_logits(base, b), predictor_logits(predictor, b)):
            assert torch.equal(x, y)


def test_load_adapter_refuses_another_base(tmp_path, predictor):
    apply_lora(predictor, rank=2, alpha=2)
    save_adapter(predictor, tmp_path / "adapter")
    other = Kronos.from_pretrained("tiny", seed=1)
    with pytest.raises(ValueError, match="trained on base weights with sha256"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(other, tmp_path)


def test_save_merged_refuses_non_finite_weights(tmp_path, predictor):
    apply_lora(predictor, rank=2, alpha=2)
    with torch.no_grad():
        predictor.transformer[0].ffn.w1.lora_b[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in 1 tensor\(s\), e.g. \['transformer.0.ffn.w1.weight'\]"):
        save_merged(predictor, tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_lora_runs_under_ddp(tmp_path, predictor):
    """One-rank gloo group: DDP builds over the adapters alone and their gradients arrive."""
    apply_lora(predictor, rank=2, alpha=2)
    randomize_adapters(predictor)  # with B = 0 the gradient of A is exactly zero
    set_trainable(predictor, ["lora", "head"])
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(predictor)
        ddp.train()
        predictor_loss(ddp, predictor_batch(predictor)).backward()
        assert parameter_groups(ddp) == parameter_groups(predictor)
        assert list(merged_state_dict(ddp)) == list(merged_state_dict(predictor))
        with pytest.raises(TypeError, match="before wrapping"):
            set_trainable(ddp, ["head"])
        # free DDP's reducer while its process group is alive: freed after destroy_process_group, gloo's
        # destructor can wait forever on its worker threads (seen once here: the suite hung in this test)
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()
    grads = {n for n, p in predictor.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set(select_trainable(predictor, ["lora", "head"]))


# ---------------------------------------------------------------------------------------------
# L2-SP


def test_l2sp_is_zero_at_start_and_has_the_right_gradient(predictor):
    set_trainable(predictor, ["head", "last:1"])
    l2sp = L2SP(predictor, strength=0.3)
    assert set(l2sp.anchor) == {n for n, p in predictor.named_parameters() if p.requires_grad}
    start = l2sp.penalty(predictor)
    assert start.item() == 0.0 and start.requires_grad
    start_hash = l2sp.anchor_hash
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in predictor.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)  # frozen ones too: they must not count
    params = dict(predictor.named_parameters())
    expected = 0.3 * sum(((params[n] - w0) ** 2).sum() for n, w0 in l2sp.anchor.items())
    penalty = l2sp.penalty(predictor)
    assert penalty.item() > 0
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    for name, p in predictor.named_parameters():
        if name in l2sp.anchor:
            torch.testing.assert_close(p.grad, 2 * 0.3 * (p.detach() - l2sp.anchor[name]))
        else:
            assert p.grad is None
    assert l2sp.anchor_hash == start_hash  # the anchor is a snapshot, not a view


def test_l2sp_rejects_bad_strength_and_empty_models(predictor):
    with pytest.raises(ValueError, match="strength"):
        L2SP(predictor, strength=-1.0)
    for p in predictor.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        L2SP(predictor, strength=1.0)


def _lora_l2sp_steps(model: Kronos, batch: dict[str, torch.Tensor], train_model: nn.Module) -> None:
    """Two AdamW steps of the LoRA + L2-SP objective (the penalty read off the bare model)."""
    l2sp = L2SP(model, strength=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        (predictor_loss(train_model, batch) + l2sp.penalty(model)).backward()
        optimizer.step()


def _ddp_worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        model = Kronos.from_pretrained("tiny", seed=0)
        apply_lora(model, rank=2, alpha=4, generator=torch.Generator().manual_seed(0))
        batch = {k: v[rank * 2 : rank * 2 + 2] for k, v in predictor_batch(model, batch=4).items()}
        ddp = nn.parallel.DistributedDataParallel(model)
        _lora_l2sp_steps(model, batch, ddp)
        save_adapter(model, f"{out_dir}/rank{rank}")
        del ddp  # the reducer goes while the group lives (see test_lora_runs_under_ddp)
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lora_with_l2sp_under_two_rank_ddp_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [load_file(str(tmp_path / f"rank{r}" / "adapter.safetensors")) for r in range(2)]
    model = Kronos.from_pretrained("tiny", seed=0)
    apply_lora(model, rank=2, alpha=4, generator=torch.Generator().manual_seed(0))
    start = lora_state_dict(model)
    _lora_l2sp_steps(model, predictor_batch(model, batch=4), model)  # the global batch in one process
    single = lora_state_dict(model)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in single), "ranks diverged: gradients not synced"
    assert any(not torch.equal(single[k], start[k]) for k in single)
    for k in single:
        torch.testing.assert_close(ranks[0][k], single[k], rtol=1e-5, atol=1e-6)


def test_save_pretrained_refuses_unmerged_adapters(tmp_path, predictor):
    apply_lora(predictor, rank=2, alpha=2)
    with pytest.raises(ValueError, match=r"unexpected \['transformer.0.ffn.w1.lora_a'.*save_merged"):
        predictor.save_pretrained(tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert Kronos.from_pretrained(save_merged(predictor, tmp_path / "merged")).config == predictor.config
