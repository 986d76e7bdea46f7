import math

import pytest
import torch

from leanft.tt import (
    CLS_TENSOR_SHAPE,
    TENSOR_SHAPE,
    TTMatrix,
    factorize,
    tt_num_params,
    tt_shape,
)

# (in, out, rank): table shapes with the input boundary between modes, inside a mode, and cutting a
# mode unevenly (dense only); factorised shapes of sizes not in the tables.
CASES = [(4096, 64, 5), (64, 4096, 5), (4096, 8, 8), (8, 4096, 8), (768, 5, 5), (1024, 64, 8), (576, 64, 5),
         (64, 576, 5), (576, 8, 8), (1536, 576, 4), (11008, 64, 5), (640, 2048, 3)]


@pytest.mark.parametrize("in_f,out_f,rank", CASES)
def test_contractions_agree_with_dense(in_f, out_f, rank):
    torch.manual_seed(0)
    tt = TTMatrix(in_f, out_f, rank, bias=True).double()
    x = torch.randn(2, 3, in_f, dtype=torch.float64)
    expected = x @ tt.to_dense() + tt.bias
    costs = tt.contraction_costs(6)
    for contraction in costs:
        torch.testing.assert_close(tt(x, contraction), expected, rtol=1e-10, atol=1e-12)


def test_factored_path_exists_where_the_boundary_allows_and_wins_at_scale():
    assert TTMatrix(4096, 64, 5).choose_contraction(512) == "factored"
    assert "factored" in TTMatrix(64, 4096, 5).contraction_costs(1)  # boundary inside a mode (16 = 4 x 4)
    uneven = TTMatrix(768, 5, 5)  # [5, 8, 12, 8]: 768 is not a prefix product nor splits a mode evenly
    assert set(uneven.contraction_costs(1)) == {"dense"}
    with pytest.raises(ValueError, match="does not split"):
        uneven(torch.randn(1, 768), "factored")


def test_leading_dims_kept_for_size_one_batch_and_sequence():
    tt = TTMatrix(64, 16, 3, bias=True)
    for shape in [(1, 1, 64), (1, 64), (64,), (3, 1, 64)]:
        assert tt(torch.randn(shape)).shape == (*shape[:-1], 16)


def test_table_shapes_and_paper_parameter_counts():
    assert tt_shape(4096, 64) == [16, 16, 16, 4, 4, 4] and tt_shape(64, 4096) == [16, 16, 16, 4, 4, 4]
    assert tt_shape(4096, 8) == TENSOR_SHAPE[8][4096] and tt_shape(768, 768) == CLS_TENSOR_SHAPE[768]
    expected = {  # METHODS.md 1.5
        (4096, 64): (1100, 2720), (4096, 8): (800, 1952), (1024, 64): (840, 2112), (1024, 8): (640, 1600),
        (768, 64): (780, 1920), (768, 8): (580, 1408), (768, 768): (1080, 2688), (1024, 1024): (1240, 3136),
        (4096, 4096): (1840, 4672),
    }
    for (i, o), (r5, r8) in expected.items():
        assert (tt_num_params(tt_shape(i, o), 5), tt_num_params(tt_shape(i, o), 8)) == (r5, r8), (i, o)
        assert TTMatrix(i, o, 5, device="meta").num_parameters() == r5


@pytest.mark.parametrize("n", [576, 640, 768, 1536, 2048, 4096, 11008, 28672, 384, 8, 1])
def test_factorize_is_exact_and_balanced(n):
    modes = factorize(n)
    assert math.prod(modes) == n
    assert max(modes) <= 64
    assert factorize(n) == modes  # deterministic


def test_unfactorable_dimension_is_a_clear_error():
    with pytest.raises(ValueError, match="prime factor 4099"):
        TTMatrix(4099, 64, 5)
    TTMatrix(4099, 64, 5, shape=[4099, 64])  # an explicit shape is the documented way out
    with pytest.raises(ValueError, match="product"):
        TTMatrix(64, 64, 5, shape=[8, 8, 8])
    with pytest.raises(ValueError, match="positive"):
        TTMatrix(64, 64, 0)


@pytest.mark.parametrize("contraction", ["dense", "factored"])
def test_under_bf16_autocast_the_product_and_the_core_gradients_match_float32(contraction):
    """A bf16 model under autocast feeds bf16 activations: the product comes back in bf16 with the values of
    the float32 product to bf16 precision, and the float32 cores get float32 gradients close to float32's."""
    torch.manual_seed(0)
    tt = TTMatrix(64, 32, 4, bias=True)
    x = torch.randn(6, 64).to(torch.bfloat16)
    weight = torch.randn(6, 32)

    def run(autocast: bool):
        tt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = tt(x if autocast else x.float(), contraction)
        (y.float() * weight).sum().backward()
        return y, [core.grad.clone() for core in tt.cores]

    (low, low_grads), (exact, exact_grads) = run(True), run(False)
    assert low.dtype == torch.bfloat16 and all(core.dtype == torch.float32 for core in tt.cores)
    assert float((low.float() - exact).norm() / exact.norm()) < 2e-2
    for g, e in zip(low_grads, exact_grads):
        assert g.dtype == torch.float32 and float((g - e).norm() / e.norm()) < 2e-2


def test_init_has_glorot_like_scale_and_frozen_copy_is_buffers():
    torch.manual_seed(0)
    tt = TTMatrix(4096, 64, 8)
    std = tt.to_dense().std().item()
    assert 0.5 < std / math.sqrt(1 / (4096 + 64)) < 2
    frozen = tt.frozen_copy()
    assert not list(frozen.parameters()) and len(list(frozen.buffers())) == len(tt.shape)
    torch.testing.assert_close(frozen.to_dense(), tt.to_dense())
    with torch.no_grad():
        tt.core_0.add_(1.0)
    assert not torch.allclose(frozen.to_dense(), tt.to_dense())


@pytest.mark.parametrize("in_f", [1024, 4096])
def test_narrow_products_are_charged_as_the_slow_kernels_they_are(in_f):
    # LoRETTA_rep's in x 8 factor: the dense product has 8 output columns, which ran 1.5-2.5x slower than
    # the factored contraction at 64-4096 tokens (results/micro-contractions-cpu.json)
    tt = TTMatrix(in_f, 8, 8, shape=TENSOR_SHAPE[8][in_f])
    assert [tt.choose_contraction(t) for t in (64, 512, 4096)] == ["factored"] * 3


# Matrices outside the measurements the cost model's constants were chosen on (those are LoRETTA's in x 8
# and in x 64 factors): square and high-rank ones, where one contraction does several times the other's
# multiply-adds. The model must see that gap and choose accordingly; whether its choices are the faster
# ones on a machine is what `leanft micro` measures (BENCHMARKS.md section 2), not a test.
HELD_OUT = [(768, 768, 5, 64, "factored"), (256, 256, 16, 512, "factored"), (1024, 16, 64, 4096, "dense"),
            (512, 16, 64, 4096, "dense")]


@pytest.mark.parametrize("in_f,out_f,rank,tokens,choice", HELD_OUT)
def test_where_one_contraction_does_several_times_the_work_the_other_is_chosen(in_f, out_f, rank, tokens, choice):
    torch.manual_seed(0)
    tt = TTMatrix(in_f, out_f, rank)
    costs = tt.contraction_costs(tokens)
    assert tt.choose_contraction(tokens) == choice and max(costs.values()) > 3 * min(costs.values())
    x = torch.randn(tokens, in_f)
    with torch.no_grad():  # and the two compute the same product
        torch.testing.assert_close(tt(x, "dense"), tt(x, "factored"), rtol=1e-4, atol=1e-4)


def test_a_hidden_size_with_a_large_prime_names_the_module_and_the_way_out(capsys):
    """A user's model whose width (4 x 71) cannot be factored usefully: the error names the module and the
    matrix, and the shapes given on the command line fix it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from leanft import cli, methods

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=284, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"on module 'model\.layers\.0\.self_attn\.q_proj'.*284x8 matrix.*"
                                         r"prime factor 71.*--tt-shapes"):
        methods.apply_method(model, "loretta-rep", "CAUSAL_LM")
    args = cli.build_parser().parse_args(["train", "--tt-shapes", "284x8=4,71,8", "8x284=8,4,71"])
    options = cli.train_config(args).method_options
    assert options["tt_shapes"] == {"284x8": [4, 71, 8], "8x284": [8, 4, 71]}
    tuned = methods.apply_method(model, "loretta-rep", "CAUSAL_LM", tt_shapes=options["tt_shapes"])
    x = torch.randint(0, 64, (1, 5))
    tuned(x).logits.sum().backward()
    assert tuned.base_model.model.model.layers[0].self_attn.q_proj.loretta_rep_A["default"].shape == [4, 71, 8]
    for bad, why in [("284x8=4,71", "multiply to 284, not 284x8 = 2272"), ("284*8=4,71,8", "expected INxOUT")]:
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["train", "--tt-shapes", bad])
        assert why in capsys.readouterr().err
