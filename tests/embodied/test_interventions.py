import pytest
import torch

from embodied.interventions import ablate, actadd, basis, orthogonalize, project_out, unit
from embodied.models import adapter
from tests.embodied import tiny_models as tm


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def random_direction(d_model: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


def stream_projections(model, x, d: torch.Tensor) -> torch.Tensor:
    """|<h, d>| / |h| of every block's input and output at every position."""
    ad = adapter(model)
    seen: list[torch.Tensor] = []

    def grab(h):
        seen.append(((h @ d).abs() / h.norm(dim=-1)).flatten())

    handles = []
    for block in ad.blocks:
        # registered after any intervention's hooks, so inputs are seen as the block receives them
        handles.append(
            block.register_forward_pre_hook(lambda m, a, k: grab(a[0] if a else k["hidden_states"]), with_kwargs=True)
        )
        handles.append(block.register_forward_hook(lambda m, a, o: grab(o[0] if isinstance(o, tuple) else o)))
    try:
        logits(model, x)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(seen)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(params=tm.FAMILIES)
def family(request):
    return request.param


def test_project_out_leaves_no_component():
    d = unit(torch.tensor([3.0, 4.0, 0.0]), 3)
    x = torch.randn(5, 3)
    assert torch.allclose(project_out(x, d) @ d, torch.zeros(5), atol=1e-6)


def test_unit_rejects_wrong_shapes_and_zero():
    with pytest.raises(ValueError, match="has 3 entries but"):
        unit(torch.ones(3), 4)
    with pytest.raises(ValueError, match="non-zero"):
        unit(torch.zeros(4), 4)


def test_orthogonalized_logits_equal_ablated_logits(family):
    model, x = tm.build(family), tm.inputs(family)
    d = random_direction(adapter(model).d_model)
    base = logits(model, x)
    with ablate(model, d):
        ablated = logits(model, x)
    ortho = orthogonalize(model, d)
    assert (ablated - base).abs().max() > 1e-2, "the direction should matter to a random model"
    torch.testing.assert_close(logits(ortho, x), ablated, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)  # the original is untouched (a copy was edited)


def test_ablation_and_orthogonalization_clear_the_direction_from_every_layer(family):
    model, x = tm.build(family), tm.inputs(family)
    d = unit(random_direction(adapter(model).d_model), adapter(model).d_model)
    assert stream_projections(model, x, d).max() > 1e-2
    with ablate(model, d):
        assert stream_projections(model, x, d).max() < 1e-5
    assert stream_projections(orthogonalize(model, d), x, d).max() < 1e-5


def test_actadd_with_zero_coefficient_is_the_identity(family):
    model, x = tm.build(family), tm.inputs(family)
    v = random_direction(adapter(model).d_model)
    base = logits(model, x)
    with actadd(model, v, layer=1, coeff=0.0):
        torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    with actadd(model, v, layer=1, coeff=2.0):
        assert (logits(model, x) - base).abs().max() > 1e-2


def test_actadd_adds_the_vector_to_the_chosen_block_input():
    model, x = tm.build("llama"), tm.inputs("llama")
    block = adapter(model).blocks[2]
    v = random_direction(32)
    seen = []

    def capture():  # hooks run in registration order: this one sees what the block receives
        return block.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True
        )

    handle = capture()
    logits(model, x)
    handle.remove()
    with actadd(model, v, layer=2, coeff=3.0):
        handle = capture()
        logits(model, x)
        handle.remove()
    torch.testing.assert_close(seen[1] - seen[0], (3.0 * v).expand_as(seen[0]), atol=1e-5, rtol=0)


def test_hooks_are_removed_on_exit_and_after_an_exception():
    model, x = tm.build("llava"), tm.inputs("llava")
    d = random_direction(32)
    base = logits(model, x)  # transformers installs its own output-recording hooks on the first forward
    before = hook_count(model)
    with ablate(model, d), actadd(model, d, layer=0, coeff=1.0):  # nested
        assert hook_count(model) > before
        both = logits(model, x)
    assert hook_count(model) == before
    with ablate(model, d):
        only_ablate = logits(model, x)
    assert (both - only_ablate).abs().max() > 1e-3, "the nested actadd took effect"
    with pytest.raises(RuntimeError, match="boom"), ablate(model, d):
        raise RuntimeError("boom")
    assert hook_count(model) == before
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)


def test_actadd_rejects_a_layer_out_of_range():
    model = tm.build("llama")
    with (
        pytest.raises(ValueError, match="layer 3 is out of range for a model with 3 blocks"),
        actadd(model, torch.ones(32), layer=3),
    ):
        pass


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "llava"])
def test_orthogonalized_model_saves_and_loads_like_any_checkpoint(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model, x = tm.build(family), tm.inputs(family)
    d = random_direction(32)
    ortho = orthogonalize(model, d)
    ortho.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if family in tm.TEXT_FAMILIES else AutoModelForImageTextToText
    loaded = auto.from_pretrained(tmp_path, use_safetensors=True).eval()
    torch.testing.assert_close(logits(loaded, x), logits(ortho, x), atol=1e-5, rtol=0)


def test_orthogonalize_in_place_edits_the_given_model():
    model, x = tm.build("qwen2"), tm.inputs("qwen2")
    d = random_direction(32)
    with ablate(model, d):
        ablated = logits(model, x)
    assert orthogonalize(model, d, inplace=True) is model
    torch.testing.assert_close(logits(model, x), ablated, atol=1e-4, rtol=0)


def random_subspace(d_model: int, k: int, seed: int = 3) -> torch.Tensor:
    """``k`` random directions, neither unit nor orthogonal (ablate must orthonormalize them)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(d_model, generator=g)
    return torch.stack([first * (i + 1) + torch.randn(d_model, generator=g) for i in range(k)])


def test_basis_is_orthonormal_and_spans_the_directions():
    D = random_subspace(32, 3)
    Q = basis(D, 32)
    torch.testing.assert_close(Q @ Q.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(project_out(D, Q), torch.zeros_like(D), atol=1e-4, rtol=0)


def test_basis_rejects_dependent_misshapen_and_non_finite_directions():
    d = torch.randn(32)
    with pytest.raises(ValueError, match="linearly dependent"):
        basis(torch.stack([d, 2 * d]), 32)
    with pytest.raises(ValueError, match=r"\(k, 32\) tensor"):
        basis(torch.randn(2, 31), 32)
    with pytest.raises(ValueError, match="finite"):
        basis(torch.tensor([[float("nan")] * 32]), 32)
    with pytest.raises(ValueError, match="linearly dependent"), ablate(tm.build("llama"), torch.zeros(2, 32)):
        pass


def test_subspace_ablation_clears_every_direction_of_the_span_from_every_layer(family):
    model, x = tm.build(family), tm.inputs(family)
    d_model = adapter(model).d_model
    D = random_subspace(d_model, 2)
    units = [unit(row, d_model) for row in D]
    assert all(stream_projections(model, x, d).max() > 1e-2 for d in units)
    with ablate(model, D):
        for d in units:
            assert stream_projections(model, x, d).max() < 1e-5
    for d in units:  # the weight edit removes the same subspace
        assert stream_projections(orthogonalize(model, D), x, d).max() < 1e-5


def test_one_direction_as_a_subspace_is_the_single_direction_ablation(family):
    model, x = tm.build(family), tm.inputs(family)
    d = random_direction(adapter(model).d_model)
    with ablate(model, d):
        single = logits(model, x)
    with ablate(model, d[None, :] * -3.0):  # a (1, d_model) subspace: sign and scale do not matter
        as_subspace = logits(model, x)
    torch.testing.assert_close(as_subspace, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "llava"])
def test_subspace_orthogonalization_equals_subspace_ablation(family):
    model, x = tm.build(family), tm.inputs(family)
    D = random_subspace(adapter(model).d_model, 3)
    with ablate(model, D):
        ablated = logits(model, x)
    with ablate(model, D[0]):
        one = logits(model, x)
    assert (ablated - one).abs().max() > 1e-2, "the other directions of the subspace should matter"
    torch.testing.assert_close(logits(orthogonalize(model, D), x), ablated, atol=1e-4, rtol=0)


def test_ablation_passes_gradients_to_the_weights():
    model, x = tm.build("llava"), tm.inputs("llava")
    model.train()
    with ablate(model, random_subspace(32, 2)):
        loss = model(**x).logits.square().mean()
    loss.backward()
    grads = [p.grad for p in adapter(model).blocks[0].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
