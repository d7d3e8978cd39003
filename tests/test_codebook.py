"""Codebook statistics, distribution shift, reconstruction report, gate, plots and widgets."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede anything that imports pyplot

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from kronos_kit.codebook import (  # noqa: E402
    PAPER_S1_USAGE,
    PAPER_S2_USAGE,
    CodebookComparison,
    CodebookCounter,
    CodebookStats,
    CodeStats,
    codebook_stats,
    compare_codebooks,
    js_distance,
    total_variation,
)
from kronos_kit.data import FEATURE_COLUMNS  # noqa: E402
from kronos_kit.gate import reconstruction_gate  # noqa: E402
from kronos_kit.reconstruction import (  # noqa: E402
    ReconstructionReport,
    code_profile,
    reconstruct_window,
    reconstruction_report,
)

REFERENCE_TOKENIZER = Path(__file__).parent / "fixtures" / "kronos_reference" / "tokenizer"
GOLDEN = Path(__file__).parent / "fixtures" / "kronos_reference" / "golden.npz"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def stats_of(s1, s2, s1_bits, s2_bits, **kw) -> CodebookStats:
    return CodebookCounter(s1_bits, s2_bits, **kw).update(torch.as_tensor(s1), torch.as_tensor(s2)).stats()


class StandInTokenizer(nn.Module):
    """Tokenizer-shaped module with known outputs: z_pre = x + s1_offset, z = x + full_offset, and
    codes from the signs of a fixed projection (LSB-first, like the real one)."""

    def __init__(self, s1_bits=2, s2_bits=2, s1_offset=None, full_offset=None, d_in=6, seed=0):
        super().__init__()
        self.s1_bits, self.s2_bits = s1_bits, s2_bits
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(d_in, s1_bits + s2_bits, generator=g))
        off1 = torch.zeros(d_in) if s1_offset is None else torch.as_tensor(s1_offset, dtype=torch.float32)
        off2 = torch.zeros(d_in) if full_offset is None else torch.as_tensor(full_offset, dtype=torch.float32)
        self.register_buffer("s1_offset", off1)
        self.register_buffer("full_offset", off2)
        self.calls: list[tuple[bool, bool]] = []  # (training, grad enabled) at each call

    def _bits(self, x):
        return (x @ self.proj >= 0).long()

    def _pack(self, bits):
        return (bits * (2 ** torch.arange(bits.shape[-1]))).sum(-1)

    def encode(self, x, half=False):
        self.calls.append((self.training, torch.is_grad_enabled()))
        b = self._bits(x)
        s1, s2 = self._pack(b[..., : self.s1_bits]), self._pack(b[..., self.s1_bits :])
        return (s1, s2) if half else s1 | (s2 << self.s1_bits)

    def decode(self, indices, half=False):
        s1, s2 = indices if half else (indices & (2**self.s1_bits - 1), indices >> self.s1_bits)
        return (s1 + s2).float()[..., None].expand(*s1.shape, self.proj.shape[0])

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        b = self._bits(x)
        quantized = b.float() * 2 - 1
        return (x + self.s1_offset, x + self.full_offset), torch.zeros(()), quantized, self._pack(b)


def make_windows(n=10, length=16, symbols=("AAA", "BBB", "CCC"), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(
            {
                "x": torch.tensor(rng.normal(size=(length, 6)), dtype=torch.float32),
                "stamp": torch.zeros(length, 5),
                "mean": torch.tensor(rng.uniform(10, 100, size=6), dtype=torch.float32),
                "std": torch.tensor(rng.uniform(0.5, 5, size=6), dtype=torch.float32),
                "symbol": symbols[i % len(symbols)],
                "start": i * 3,
            }
        )
    return out


def loader(windows, batch_size=4):
    return torch.utils.data.DataLoader(windows, batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------------
# statistics of one vocabulary, on hand-made indices
# ------------------------------------------------------------------------------------------------


def test_paper_constants():
    assert PAPER_S1_USAGE == pytest.approx(0.9766)
    assert PAPER_S2_USAGE == pytest.approx(0.8525)


def test_uniform_usage():
    s1 = torch.arange(16).repeat(5)  # every code 5 times
    s2 = torch.arange(16).repeat(5)
    st = stats_of(s1, s2, 4, 4)
    for cs in (st.s1, st.s2):
        assert cs.vocab_size == 16 and cs.n_tokens == 80
        assert cs.perplexity == pytest.approx(16)
        assert cs.normalized_entropy == pytest.approx(1.0)
        assert cs.usage == 1.0 and cs.n_dead == 0 and cs.dead_codes.size == 0
        assert cs.top_k == 1 and cs.top1pct_share == pytest.approx(1 / 16)
    # s1 == s2, so the joint code is 17 * c: 16 equally used codes out of 256
    assert st.joint.vocab_size == 256
    assert st.joint.used_codes.tolist() == [17 * c for c in range(16)]
    assert st.joint.perplexity == pytest.approx(16)
    assert st.joint.usage == pytest.approx(16 / 256)
    assert st.joint.normalized_entropy == pytest.approx(math.log(16) / math.log(256))


def test_single_code():
    st = stats_of(torch.full((3, 7), 5), torch.zeros(3, 7, dtype=torch.long), 4, 3)
    assert st.s1.perplexity == pytest.approx(1.0)
    assert st.s1.entropy == pytest.approx(0.0)
    assert st.s1.normalized_entropy == pytest.approx(0.0)
    assert st.s1.usage == pytest.approx(1 / 16)
    assert st.s1.n_dead == 15 and 5 not in st.s1.dead_codes
    assert st.s1.top1pct_share == pytest.approx(1.0)
    assert st.s2.vocab_size == 8 and st.s2.counts.tolist() == [21] + [0] * 7
    assert st.joint.used_codes.tolist() == [5]


def test_known_entropy():
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 bits
    st = stats_of([0, 0, 1, 2], [0, 0, 0, 0], 2, 1)
    assert st.s1.entropy == pytest.approx(1.5 * math.log(2))
    assert st.s1.perplexity == pytest.approx(2**1.5)
    assert st.s1.normalized_entropy == pytest.approx(0.75)
    assert st.s1.usage == 0.75 and st.s1.dead_codes.tolist() == [3]


def test_top1pct_share():
    # 1024 codes -> the top 1% is 10 codes; they hold 10 * 100 of 2000 tokens
    s1 = torch.cat([torch.arange(10).repeat_interleave(100), torch.arange(10, 1010)])
    st = stats_of(s1, torch.zeros_like(s1), 10, 1)
    assert st.s1.top_k == 10
    assert st.s1.top1pct_share == pytest.approx(0.5)
    assert st.s1.n_used == 1010 and st.s1.n_dead == 14


def test_bit_balance_lsb_first():
    s1 = torch.tensor([1, 1, 1, 3])  # bit0 always 1; bit1 once
    s2 = torch.tensor([1, 0, 0, 0])
    st = stats_of(s1, s2, 2, 1)
    assert st.bit_balance == pytest.approx([1.0, 0.25, 0.25])
    st = stats_of(torch.arange(4), torch.tensor([1, 1, 1, 0]), 2, 1)
    assert st.bit_balance == pytest.approx([0.5, 0.5, 0.75])


def test_streaming_equals_one_shot_and_merge():
    g = torch.Generator().manual_seed(1)
    s1 = torch.randint(0, 8, (40, 25), generator=g)
    s2 = (torch.randint(0, 32, (40, 25), generator=g) ** 2) % 32  # skewed
    one = stats_of(s1, s2, 3, 5)
    streamed = CodebookCounter(3, 5)
    for a, b in zip(s1.split(7), s2.split(7)):  # uneven batches
        streamed.update(a, b)
    assert streamed.n_tokens == 1000
    assert streamed.stats().to_dict() == one.to_dict()
    # counting without the joint vocabulary gives the same marginals
    no_joint = CodebookCounter(3, 5, joint=False).update(s1, s2).stats()
    assert no_joint.joint is None
    assert no_joint.s1.to_dict() == one.s1.to_dict() and no_joint.bit_balance == one.bit_balance
    # merging two halves is the same as counting everything
    a = CodebookCounter(3, 5).update(s1[:13], s2[:13])
    b = CodebookCounter(3, 5).update(s1[13:], s2[13:])
    assert a.merge(b).stats().to_dict() == one.to_dict()
    # numpy input works too
    assert stats_of(s1.numpy(), s2.numpy(), 3, 5).to_dict() == one.to_dict()


def test_counter_rejects_bad_input():
    c = CodebookCounter(2, 2)
    with pytest.raises(ValueError, match="s1 indices"):
        c.update(torch.tensor([4]), torch.tensor([0]))
    with pytest.raises(ValueError, match="s2 indices"):
        c.update(torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="same number"):
        c.update(torch.tensor([0, 1]), torch.tensor([0]))
    assert c.n_tokens == 0  # nothing half-counted
    empty = c.stats()
    assert empty.n_tokens == 0 and math.isnan(empty.s1.perplexity)


def test_stats_json_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    st = stats_of(torch.randint(0, 1024, (5000,), generator=g), torch.randint(0, 64, (5000,), generator=g), 10, 6)
    d = json.loads(json.dumps(st.to_dict()))
    assert "nonzero_codes" in d["joint"]  # 2**16 codes are written sparsely
    assert len(d["s1"]["counts"]) == 1024
    back = CodebookStats.from_dict(d)
    assert back.to_dict() == st.to_dict()
    np.testing.assert_array_equal(back.joint.counts, st.joint.counts)
    assert CodebookStats.load(st.save(tmp_path / "s.json")).to_dict() == st.to_dict()
    frame = st.to_frame()
    assert list(frame.index) == ["s1", "s2", "joint"]
    assert frame.loc["s1", "paper_usage"] == PAPER_S1_USAGE  # 1,024 codes, as in the paper
    assert frame.loc["s2", "usage"] == pytest.approx(st.s2.usage)
    # a 64-code level's usage is not set beside the paper's 1,024-code figure as if comparable
    assert np.isnan(frame.loc["s2", "paper_usage"]) and np.isnan(frame.loc["joint", "paper_usage"])
    assert "s1 usage" in st.summary() and "(paper 97.66%)" in st.summary()
    assert "the paper's 85.25% is of 1,024 codes: not comparable" in st.summary()
    assert CodeStats.from_dict(st.s1.to_dict()).perplexity == pytest.approx(st.s1.perplexity)


# ------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------


def test_distances_known_values():
    p = np.array([3, 1, 0, 0])
    assert total_variation(p, p * 7) == 0.0
    assert js_distance(p, p * 7) == pytest.approx(0.0, abs=1e-7)
    q = np.array([0, 0, 2, 5])
    assert total_variation(p, q) == pytest.approx(1.0)
    assert js_distance(p, q) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2): TV 1/2; JSD = (log2(4/3) + 1/2 log2(2/3) + 1/2) / 2
    jsd = 0.5 * (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5)
    assert total_variation([1, 0], [1, 1]) == pytest.approx(0.5)
    assert js_distance([1, 0], [1, 1]) == pytest.approx(math.sqrt(jsd))


def test_compare_codebooks():
    before = stats_of([0, 0, 1, 2], [0, 1, 1, 1], 2, 1)
    after = stats_of([1, 3, 3, 3], [0, 1, 1, 1], 2, 1)
    cmp = compare_codebooks(before, after)
    assert cmp.s1.newly_used == [3] and cmp.s1.newly_dead == [0, 2]
    # before (1/2, 1/4, 1/4, 0), after (0, 1/4, 0, 3/4): TV = (1/2 + 0 + 1/4 + 3/4) / 2
    assert cmp.s1.tv == pytest.approx(0.75)
    assert cmp.s2.tv == 0.0 and cmp.s2.newly_used == [] and cmp.s2.js_distance == pytest.approx(0, abs=1e-7)
    same = compare_codebooks(before, before, names=("train", "test"))
    assert same.s1.tv == 0 and same.joint.tv == 0
    text = cmp.summary()
    assert text.startswith("From before to after:") and text.count("\n") == 0
    assert "s1 TV 0.750" in text and "1 newly used, 2 newly dead" in text
    assert CodebookComparison.from_dict(json.loads(json.dumps(cmp.to_dict()))) == cmp
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        compare_codebooks(before, stats_of([0], [0], 3, 1))


# ------------------------------------------------------------------------------------------------
# running a tokenizer
# ------------------------------------------------------------------------------------------------


def test_codebook_stats_with_stand_in():
    windows = make_windows(n=9)
    tok = StandInTokenizer(s1_bits=3, s2_bits=2).train()
    st = codebook_stats(tok, loader(windows), progress=False)
    x = torch.stack([w["x"] for w in windows])
    s1, s2 = tok.encode(x, half=True)
    assert st.to_dict() == stats_of(s1, s2, 3, 2).to_dict()
    assert st.n_tokens == 9 * 16
    assert tok.calls[0] == (False, False)  # eval mode, no grad
    assert tok.training  # mode restored
    # a list of windows is batched for us; max_batches stops early (3 batches of 2)
    part = codebook_stats(tok, [{"x": w["x"][None]} for w in windows], max_batches=3, progress=True)
    assert part.n_tokens == 3 * 16
    assert codebook_stats(tok, windows, progress=False).to_dict() == st.to_dict()


def test_reconstruction_report_offsets_by_hand():
    a = np.array([0.5, -1.0, 0.25, 2.0, 0.0, -0.1])  # s1-only decoder error per channel
    b = np.array([0.1, 0.2, -0.1, 0.0, 0.3, 0.05])  # full decoder error
    tok = StandInTokenizer(s1_offset=a, full_offset=b)
    windows = make_windows(n=10, length=16)
    rep = reconstruction_report(tok, loader(windows, 4), progress=False)
    assert rep.n_windows == 10 and rep.features == list(FEATURE_COLUMNS)
    np.testing.assert_allclose(rep.overall["s1"].mse, a**2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rep.overall["s1"].mae, np.abs(a), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rep.overall["full"].mse, b**2, rtol=1e-5, atol=1e-7)
    # in price space the error of a bar is offset * (std + 1e-5) of its window
    for sym in ("AAA", "BBB", "CCC"):
        stds = np.stack([w["std"].numpy().astype(np.float64) for w in windows if w["symbol"] == sym]) + 1e-5
        got = rep.per_symbol[sym]
        assert got["s1"].n_bars == 16 * len(stds)
        np.testing.assert_allclose(got["s1"].price_mse, ((a * stds) ** 2).mean(0), rtol=1e-5)
        np.testing.assert_allclose(got["full"].price_mae, np.abs(b * stds).mean(0), rtol=1e-5)
        np.testing.assert_allclose(got["full"].mse, b**2, rtol=1e-5, atol=1e-7)
    all_std = np.stack([w["std"].numpy().astype(np.float64) for w in windows]) + 1e-5
    np.testing.assert_allclose(rep.overall["s1"].price_mse, ((a * all_std) ** 2).mean(0), rtol=1e-5)
    assert rep.full_mse == pytest.approx(float((b**2).mean()), rel=1e-5)
    assert rep.s1_mse == pytest.approx(float((a**2).mean()), rel=1e-5)


class NonlinearStandIn(StandInTokenizer):
    def forward(self, x):
        out = super().forward(x)
        return (0.5 * x + 0.1 * torch.sin(3 * x), 0.9 * x), *out[1:]


def test_reconstruction_report_matches_numpy_and_frame(tmp_path):
    tok = NonlinearStandIn()
    windows = make_windows(n=7, length=12, seed=3)
    x = np.stack([w["x"].numpy() for w in windows]).astype(np.float64)
    std = np.stack([w["std"].numpy() for w in windows])[:, None, :] + 1e-5
    rep = reconstruction_report(tok, loader(windows, 3), progress=False)
    for dec, recon in (("s1", 0.5 * x + 0.1 * np.sin(3 * x)), ("full", 0.9 * x)):
        err = recon - x
        np.testing.assert_allclose(rep.overall[dec].mse, (err**2).mean((0, 1)), rtol=1e-5)
        np.testing.assert_allclose(rep.overall[dec].mae, np.abs(err).mean((0, 1)), rtol=1e-5)
        np.testing.assert_allclose(rep.overall[dec].price_mae, np.abs(err * std).mean((0, 1)), rtol=1e-5)
    frame = rep.to_frame()
    assert frame.loc[("(all)", "full", "mse"), "close"] == pytest.approx(rep.overall["full"].mse[3])
    assert frame.loc[("AAA", "s1", "mae"), "mean"] == pytest.approx(np.mean(rep.per_symbol["AAA"]["s1"].mae))
    assert math.isnan(frame.loc[("(all)", "full", "price_mse"), "mean"])  # no mean across units
    assert list(frame.columns) == ["n_bars", *FEATURE_COLUMNS, "mean"]
    assert len(rep.to_frame(per_symbol=False)) == 2 * 4
    back = ReconstructionReport.load(rep.save(tmp_path / "rep.json"))
    assert back.to_dict() == rep.to_dict()
    # bare tensors: no symbols and no price metrics
    bare = reconstruction_report(tok, [torch.tensor(x[:4], dtype=torch.float32)], progress=False)
    assert bare.per_symbol == {} and bare.overall["full"].price_mse is None
    np.testing.assert_allclose(bare.overall["full"].mse, ((0.1 * x[:4]) ** 2).mean((0, 1)), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# tables (the gate's own tests are in test_gate.py)
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def good_and_bad():
    windows = make_windows(n=6)
    good = reconstruction_report(StandInTokenizer(s1_offset=[0.3] * 6, full_offset=[0.1] * 6), windows, progress=False)
    bad = reconstruction_report(StandInTokenizer(s1_offset=[0.5] * 6, full_offset=[0.8] * 6), windows, progress=False)
    return good, bad


def test_tables_can_leave_volume_prices_out(good_and_bad):
    good, _ = good_and_bad
    table = good.to_frame(per_symbol=False, volume_prices=False)
    price_rows = table.xs("price_mse", level="metric")
    assert price_rows[["volume", "amount"]].isna().all().all() and price_rows["close"].notna().all()
    normalized = table.xs("mse", level="metric")
    pd.testing.assert_frame_equal(normalized, good.to_frame(per_symbol=False).xs("mse", level="metric"))


# ------------------------------------------------------------------------------------------------
# the real tokenizer
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_tokenizer():
    from kronos_kit.model import KronosTokenizer

    return KronosTokenizer.from_pretrained(REFERENCE_TOKENIZER)


def test_real_tokenizer_against_golden(real_tokenizer):
    g = np.load(GOLDEN)
    x = torch.tensor(g["x"])
    st = codebook_stats(real_tokenizer, [x], progress=False)
    assert (st.s1_bits, st.s2_bits) == (4, 4)
    # counts agree with the reference indices, and the bit balance computed from indices equals the
    # share of positive quantized dims: that pins the LSB-first bit order
    np.testing.assert_array_equal(st.s1.counts, np.bincount(g["s1"].ravel(), minlength=16))
    np.testing.assert_array_equal(st.joint.counts, np.bincount(g["full_idx"].ravel(), minlength=256))
    np.testing.assert_allclose(st.bit_balance, (g["quantized"] >= 0).mean((0, 1)), atol=1e-12)

    rep = reconstruction_report(real_tokenizer, [x], progress=False)
    xx = g["x"].astype(np.float64)
    np.testing.assert_allclose(rep.overall["s1"].mse, ((g["z_pre"] - xx) ** 2).mean((0, 1)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rep.overall["full"].mae, np.abs(g["z"] - xx).mean((0, 1)), rtol=1e-4, atol=1e-6)
    gate = reconstruction_gate(rep, st)
    assert gate.metrics["full_mse"] == pytest.approx(float(((g["z"] - xx) ** 2).mean()), rel=1e-4)


def test_real_tokenizer_on_windows(real_tokenizer):
    windows = make_windows(n=5, length=20, seed=4)
    x = torch.stack([w["x"] for w in windows])
    with torch.no_grad():
        (z_pre, z), *_ = real_tokenizer(x)
    std = torch.stack([w["std"] for w in windows])[:, None, :].double() + 1e-5
    rep = reconstruction_report(real_tokenizer, loader(windows, 2), progress=False)
    np.testing.assert_allclose(
        rep.overall["full"].price_mse, (((z - x).double() * std) ** 2).mean((0, 1)).numpy(), rtol=1e-4
    )
    rec = reconstruct_window(real_tokenizer, windows[2])
    np.testing.assert_allclose(rec.full_recon, z[2].numpy(), atol=1e-5)
    np.testing.assert_allclose(
        rec.denormalize(rec.x), windows[2]["x"] * (windows[2]["std"] + 1e-5) + windows[2]["mean"], rtol=1e-6
    )
    s1, s2 = real_tokenizer.encode(x, half=True)
    np.testing.assert_array_equal(rec.s1_ids, s1[2].numpy())
    assert rec.symbol == windows[2]["symbol"] and rec.start == windows[2]["start"]


def test_real_tokenizer_on_window_dataset(real_tokenizer):
    from kronos_kit.data import WindowDataset, load_ohlcv

    frame = load_ohlcv(Path(__file__).parent / "data" / "ashare_5min_sample.csv")
    ds = WindowDataset(frame, lookback=48, predict=15, stride=64)
    assert _first_close_matches_frame(ds, frame)
    rep = reconstruction_report(real_tokenizer, loader(ds, 8), progress=False)
    st = codebook_stats(real_tokenizer, ds, progress=False)  # a dataset is batched for us
    assert rep.n_windows == len(ds) and st.n_tokens == len(ds) * ds.window
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["x"] for it in items])
    mean = torch.stack([it["mean"] for it in items])[:, None, :].double()
    scale = torch.stack([it["std"] for it in items])[:, None, :].double() + 1e-5
    with torch.no_grad():
        (_, z), *_ = real_tokenizer(x)
    # price-space error = de-normalized reconstruction minus de-normalized input
    by_hand = ((z.double() * scale + mean) - (x.double() * scale + mean)).abs().mean((0, 1)).numpy()
    np.testing.assert_allclose(rep.per_symbol["ashare_5min_sample"]["full"].price_mae, by_hand, rtol=1e-4)
    np.testing.assert_array_equal(
        st.s1.counts, np.bincount(real_tokenizer.encode(x, half=True)[0].ravel(), minlength=16)
    )

    from kronos_kit.widgets import code_inspector, window_browser

    box = window_browser({"reference": real_tokenizer}, ds)
    assert "ashare_5min_sample" in box.children[2].value and box.children[1].max == len(ds) - 1
    assert code_inspector(real_tokenizer, ds).children[0].max == 15


def _first_close_matches_frame(ds, frame) -> bool:
    """De-normalizing an unclipped window gives back the frame's prices (so 'price space' is prices)."""
    item = ds[0]
    close = (item["x"][:, 3].double() * (item["std"][3].double() + 1e-5) + item["mean"][3].double()).numpy()
    raw = frame["close"].to_numpy()[item["start"] : item["start"] + ds.window]
    unclipped = item["x"][:, 3].abs().numpy() < ds.clip
    return bool(unclipped.any() and np.allclose(close[unclipped], raw[unclipped], rtol=1e-4))


# ------------------------------------------------------------------------------------------------
# plots and widgets
# ------------------------------------------------------------------------------------------------


def render(fig) -> bytes:
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
    return buf.getvalue()


def test_plots_render():
    from kronos_kit import plots
    from kronos_kit.plots.codebook import plot_code_heatmap

    before = stats_of(torch.arange(16).repeat(4), torch.arange(16).repeat(4), 4, 4)
    after = stats_of(torch.tensor([0, 0, 0, 1, 2, 5]), torch.tensor([1, 1, 2, 3, 3, 3]), 4, 4)

    fig = plots.plot_rank_frequency({"before": before, "after": after})
    lines = fig.axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [16, 4]  # after: only the 4 used codes
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    render(fig)

    fig = plot_code_heatmap(after)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (4, 4)
    assert ax.collections[0].get_offsets().shape == (12, 2)  # 12 dead codes marked
    render(fig)
    render(plot_code_heatmap(after, level="joint"))  # 16 x 16 grid

    fig = plots.plot_bit_balance({"before": before, "after": after})
    assert len(fig.axes[0].patches) == 2 * 8
    render(fig)

    windows = make_windows(n=4)
    rep_a = reconstruction_report(StandInTokenizer(s1_offset=[0.3] * 6), windows, progress=False)
    rep_b = reconstruction_report(NonlinearStandIn(), windows, progress=False)
    fig = plots.plot_channel_errors({"before": rep_a, "after": rep_b}, metric="price_mae")
    # price space: a row per decoder, OHLC, volume and amount each on their own axes
    assert len(fig.axes) == 6 and [len(ax.patches) for ax in fig.axes[:3]] == [2 * 4, 2, 2]
    render(fig)

    rec = reconstruct_window(NonlinearStandIn(), windows[0])
    render(plots.plot_window_reconstruction(rec))
    render(plots.plot_reconstruction(rec.x, rec.s1_recon, rec.full_recon))  # normalized, no mean/std

    prof = code_profile(StandInTokenizer(), windows)
    render(plots.plot_code_candle(prof, int(np.argmax(prof.counts))))
    render(plots.plot_code_candle(prof, 0) if prof.counts[0] == 0 else plots.plot_code_candle(prof, 3))



def test_the_code_candle_keeps_its_title_and_labels_inside_the_figure():
    """The code inspector in Lab showed "s1 code 59 (111011): channel mear" and "n normalized value (each channel
    averaged on its own)": the title and the y label ran past the figure's edges and were cut off."""
    from kronos_kit.plots import plot_code_candle

    prof = code_profile(StandInTokenizer(), make_windows(n=4))
    for code in (int(np.argmax(prof.counts)), len(prof.counts) - 1):
        fig = plot_code_candle(prof, code)
        fig.draw_without_rendering()  # constrained layout places everything it can
        ax, edge = fig.axes[0], fig.bbox
        for text in (t for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()):
            box = text.get_window_extent()
            assert edge.x0 <= box.x0 and box.x1 <= edge.x1 and edge.y0 <= box.y0 and box.y1 <= edge.y1, \
                (text.get_text(), box, edge)


def test_code_profile_by_hand():
    windows = make_windows(n=3, length=8)
    tok = StandInTokenizer()
    prof = code_profile(tok, windows)
    x = torch.stack([w["x"] for w in windows]).reshape(-1, 6)
    s1, _ = tok.encode(x, half=True)
    code = int(torch.bincount(s1).argmax())
    assert prof.counts.tolist() == torch.bincount(s1, minlength=4).tolist()
    np.testing.assert_allclose(prof.mean_ohlc(code), x[s1 == code][:, :4].double().mean(0).numpy(), rtol=1e-6)


def test_widgets_build_without_kernel():
    import ipywidgets

    from kronos_kit.widgets import code_inspector, window_browser

    windows = make_windows(n=7)
    before = StandInTokenizer(seed=0)
    after = StandInTokenizer(seed=1, full_offset=[0.2] * 6)
    box = window_browser({"before": before, "after": after}, windows)
    assert isinstance(box, ipywidgets.VBox)
    (symbol, which), position, info, figure, codes = box.children[0].children, *box.children[1:]
    assert symbol.options == ("AAA", "BBB", "CCC") and which.options == ("before", "after")
    assert "image/png" in figure.outputs[0]["data"]
    s1, s2 = before.encode(windows[0]["x"][None], half=True)
    assert codes.value.count("<td") == 3 * 16
    assert f">{int(s1[0, -1])}</td></tr><tr><th>s2</th>" in codes.value

    symbol.value = "BBB"  # windows 1 and 4
    assert position.max == 1
    position.value = 1
    which.value = "after"
    s1, s2 = after.encode(windows[4]["x"][None], half=True)
    assert f">{int(s2[0, -1])}</td></tr></table>" in codes.value
    assert f"window 2/2 (bars {int(windows[4]['start'])}.." in info.value and len(figure.outputs) == 1

    insp = code_inspector(before, loader(windows))
    slider, text, out = insp.children
    assert isinstance(slider, ipywidgets.IntSlider) and slider.max == 3
    counts = np.bincount(before.encode(torch.stack([w["x"] for w in windows]), half=True)[0].ravel(), minlength=4)
    assert slider.value == int(np.argmax(counts))
    slider.value = (slider.value + 1) % 4
    assert f"{counts[slider.value]:,} of {counts.sum():,} bar positions" in text.value
    assert "windows overlap" in text.value and "not one real candle" in text.value
    assert "image/png" in out.outputs[0]["data"]
    # a saved notebook opened without a kernel shows the plain-text fallback: a note, not VBox(children=...)
    for widget in (box, insp):
        plain = widget._repr_mimebundle_()["text/plain"]
        assert "needs a live kernel" in plain and "children" not in plain and len(plain) <= 110
    assert "over all 6 channels" in info.value and "open, high, low, close only" in info.value
