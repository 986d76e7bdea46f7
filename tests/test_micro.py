import pytest
import torch
from torch import nn

from leanft.measure import micro, report

SIZES, TOKENS, RANK = (96, 128), 16, 8  # above the 64 bottleneck of LoRETTA_adp; LoRA and LaMDA rank 8


@pytest.fixture(scope="module")
def layers() -> dict:
    return micro.layer_bench(hidden_sizes=SIZES, tokens=TOKENS, repeats=2, device="cpu")


@pytest.fixture(scope="module")
def contractions() -> dict:
    return micro.contraction_bench(hidden_sizes=SIZES, tokens=(1, TOKENS), repeats=2, device="cpu", min_sample_s=0)


def rows_by_key(result: dict) -> dict:
    return {(r["d"], r["method"]): r for r in result["rows"]}


def test_layer_rows_cover_every_method_and_size(layers):
    rows = rows_by_key(layers)
    assert list(rows) == [(d, m) for d in SIZES for m in ("base", *micro.LAYER_METHODS)]
    assert layers["device"] == "cpu" and layers["dtype"] == "float32" and layers["tokens"] == TOKENS
    assert layers["rounds"] == {d: {"fwd": 2, "fwdbwd": 2} for d in SIZES}


def test_no_lora_means_no_ratios():
    result = micro.layer_bench(hidden_sizes=(96,), methods=("lamda",), tokens=4, repeats=1, device="cpu")
    assert [r["method"] for r in result["rows"]] == ["base", "lamda"]
    assert all(r["fwd_vs_lora"] is None and r["mem_vs_lora"] is None for r in result["rows"])


def test_trainable_counts_match_the_built_layers(layers):
    rows = rows_by_key(layers)
    for d in SIZES:
        base = nn.Linear(d, d)
        tt = {m: sum(t.num_parameters() for t in micro.tt_matrices(micro.build(m, base)).values())
              for m in micro.TT_METHODS}
        assert rows[d, "base"]["trainable"] == 0
        assert rows[d, "lora"]["trainable"] == 2 * RANK * d  # A: r x d, B: d x r
        assert rows[d, "lamda"]["trainable"] == RANK * RANK + d * RANK  # S and P_B (P_A is frozen)
        assert rows[d, "loretta-rep"]["trainable"] == tt["loretta-rep"]
        assert rows[d, "loretta-adp"]["trainable"] == tt["loretta-adp"]
        assert len(micro.tt_matrices(micro.build("loretta-adp", base))) == 2  # frozen start copies left out


def test_cpu_memory_follows_what_each_method_must_save(layers):
    """Frozen base: it saves only its weight (a parameter), so nothing counts. LaMDA's frozen P_A needs no
    input for backward: it saves h = P_A x (T x r) and M = s (P_B S - P_B0 S0) (d x r), plus the gradients
    of S and P_B. LoRA's A needs its (dropped-out) d-wide input for its own gradient, so it saves more."""
    rows = rows_by_key(layers)
    for d in SIZES:
        assert rows[d, "base"]["mem_bytes"] == 0
        lamda = 4 * (TOKENS * RANK + d * RANK + RANK * RANK + d * RANK)
        assert rows[d, "lamda"]["mem_bytes"] == lamda
        assert rows[d, "lora"]["mem_bytes"] >= 4 * (TOKENS * d + TOKENS * RANK + 2 * d * RANK) > lamda


def test_contraction_rows_auto_choice_and_agreement(contractions):
    rows = contractions["rows"]
    assert len(rows) == len(SIZES) * 4 * 2  # A, B, down, up at two token counts
    for d in SIZES:
        base = nn.Linear(d, d)
        built = {m: micro.tt_matrices(micro.build(m, base)) for m in micro.TT_METHODS}
        matrices = {(m, name): t for m, tts in built.items() for name, t in tts.items()}
        assert {r["matrix"] for r in rows if r["d"] == d} == {name for _, name in matrices}
        for r in (r for r in rows if r["d"] == d):
            tt = matrices[r["method"], r["matrix"]]
            assert r["shape"] == tt.shape and (r["in"], r["out"]) == (tt.in_features, tt.out_features)
            assert r["auto"] == tt.choose_contraction(r["tokens"])
            assert set(r["fwd_ms"]) == set(r["fwdbwd_ms"]) == {*tt.contraction_costs(r["tokens"]), "auto"}
            assert r["max_diff"] < 1e-5


def test_contractions_agree_on_real_matrices():
    x = torch.randn(5, 96, dtype=torch.float64)
    tt = micro.tt_matrices(micro.build("loretta-adp", nn.Linear(96, 96)))["loretta_adp_adapter.down"].double()
    outputs = [tt(x, mode) for mode in tt.contraction_costs(5)]
    assert len(outputs) == 2
    torch.testing.assert_close(outputs[0], outputs[1])


def test_markdown_tables(layers, contractions):
    text = report.micro_markdown(layers)
    assert "on cpu" in text and "float32" in text and text.count("\n| 96 |") == 5
    text = report.micro_markdown(contractions)
    assert "on cpu" in text and "float32" in text and text.count("\n| 128 |") == 8
    header, rule = text.splitlines()[4:6]
    assert header.count("|") == rule.count("|")


def test_zero_core_start_costs_fewer_adapter_flops_than_the_noise_free_one():
    """The noise-free start evaluates a frozen copy of the adapter every call; the zero-core start does not,
    so its multiply-adds are those of the reference (random) start, which has no copy either."""
    methods = ("lora", "loretta-rep-noise-free", "loretta-rep-zero", "loretta-rep-reference", "loretta-adp-noise-free",
               "loretta-adp-zero")
    result = micro.layer_bench(hidden_sizes=(128,), methods=methods, tokens=TOKENS, repeats=1, device="cpu",
                               min_sample_s=0)
    rows = rows_by_key(result)
    assert rows[128, "base"]["fwd_macs_per_token"] == rows[128, "base"]["fwdbwd_macs_per_token"] == 0
    assert rows[128, "lora"]["fwd_macs_per_token"] == 2 * RANK * 128  # x A (d x r), then B (r x d)
    for method in micro.TT_METHODS:
        zero, noise_free = rows[128, f"{method}-zero"], rows[128, f"{method}-noise-free"]
        assert zero["trainable"] == noise_free["trainable"]
        for key in ("fwd_macs_per_token", "fwdbwd_macs_per_token"):
            assert 0 < zero[key] < noise_free[key], (method, key)
    assert rows[128, "loretta-rep-zero"]["fwd_macs_per_token"] == rows[128, "loretta-rep-reference"]["fwd_macs_per_token"]
    assert "fwd MACs/token" in report.micro_markdown(result)
