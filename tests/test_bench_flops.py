"""benchmarks/flops.py: the FLOPs a step actually performs, checked by hand on a tiny shape and against PyTorch's own
FLOP counter on real forward/backward passes (a Hugging Face Llama and lit_align's prompt-shared DPO forward)."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import LlamaShape, Pass, attention_flops, forward_flops, pass_flops, step_flops  # noqa: E402

# 1 layer, hidden 4, intermediate 8, 2 query heads of dim 2, 1 key/value head, vocabulary 10
SMALL = LlamaShape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, vocab=10, tied=True)
SMOLLM2_135M = LlamaShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True)


def test_hand_computed_small_shape():
    """Linear weights per block: q 4x4 + k 4x2 + v 4x2 + o 4x4 + gate/up/down 3 x 4x8 = 16+8+8+16+96 = 144, so
    2*144 = 288 FLOPs a token. One row of 3 tokens: linear 3*288 = 864; attention 2 heads x (2*2*3*3*2) = 144;
    unembedding 2*4*10 = 80 a position, 240 at all 3. Forward 1248; trained 3 x 1248 = 3744; recomputing the head's
    logits in backward adds 240; a frozen pass is its forward; a head at 2 positions costs 160; a scalar head 2*4."""
    assert SMALL.layer_matmul_params == 144
    one = Pass(rows=1, length=3, head="lm", trained=False)
    assert forward_flops(SMALL, one) == {"linear": 864, "attention": 144, "head": 240}
    assert pass_flops(SMALL, one) == 1248
    assert pass_flops(SMALL, Pass(1, 3, "lm", trained=True)) == 3744
    assert pass_flops(SMALL, Pass(1, 3, "lm", trained=True, recompute_head=True)) == 3984
    assert forward_flops(SMALL, Pass(1, 3, "lm", head_positions=2))["head"] == 160
    assert forward_flops(SMALL, Pass(1, 3, "score"))["head"] == 3 * 8
    assert forward_flops(SMALL, Pass(1, 3, None))["head"] == 0
    # two rows of 3 = twice the work; a step is the sum of its passes (policy trained + frozen reference)
    assert pass_flops(SMALL, Pass(2, 3, "lm", trained=False)) == 2 * 1248
    assert step_flops(SMALL, [Pass(1, 3, trained=True), Pass(1, 3, trained=False)]) == 3744 + 1248
    # attention grows with the square of the padded length
    assert attention_flops(SMALL, 1, 6) == 4 * attention_flops(SMALL, 1, 3)


def test_bad_shapes_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="heads"):
        LlamaShape(hidden=10, intermediate=8, layers=1, heads=4, kv_heads=1, vocab=10)
    with pytest.raises(ValueError, match="head_positions"):
        Pass(rows=1, length=3, head_positions=4)


def test_smollm2_parameters_and_the_2n_rule():
    """SmolLM2-135M has 134,515,008 parameters. For a plain causal-LM forward (unembedding at every position) the
    count is 2 * parameters * tokens (the tied embedding counted once, as the unembedding's matmul) plus the
    attention term, to within 0.1% (the norms), and attention adds about a quarter at length 1024."""
    assert SMOLLM2_135M.params() == 134_515_008
    p = Pass(rows=8, length=1024, head="lm", trained=False)
    counted = pass_flops(SMOLLM2_135M, p)
    rule = 2 * SMOLLM2_135M.params() * 8 * 1024 + attention_flops(SMOLLM2_135M, 8, 1024)
    assert abs(counted / rule - 1) < 1e-3
    share = forward_flops(SMOLLM2_135M, p)["attention"] / counted
    assert 0.15 < share < 0.3


def _llama(shape: LlamaShape):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                         tie_word_embeddings=shape.tied)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"  # its bmm's are what the FLOP counter sees of attention
    return model


def test_counts_equal_torch_flop_counter_on_a_padded_llama_forward_and_backward():
    """PyTorch's FlopCounterMode on a Hugging Face Llama (2 layers, grouped-query attention, a padded batch of 3 rows
    of 7): the forward equals the count exactly (linear layers, attention over the padded rectangle, unembedding at
    every position), and forward + backward equals 3x it."""
    shape = LlamaShape(hidden=16, intermediate=24, layers=2, heads=4, kv_heads=2, vocab=50, tied=True)
    model = _llama(shape)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with FlopCounterMode(display=False) as frozen, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert frozen.get_total_flops() == pass_flops(shape, Pass(3, 7, "lm", trained=False))
    with FlopCounterMode(display=False) as trained:
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert trained.get_total_flops() == pass_flops(shape, Pass(3, 7, "lm", trained=True))


def test_lit_align_packed_dpo_forward_matches_its_recorded_passes():
    """lit_align's prompt-shared DPO log-probs (one packed row per comparison, unembedding only at the scored
    positions, tiled log-probs that recompute the logits in backward), run under FlopCounterMode, perform exactly the
    FLOPs that benchmarks/vs_trl.py records for such a batch (policy trained + live reference forward)."""
    from lit_align.data.preference import PreferenceCollator
    from lit_align.forward import response_logps

    vs_trl = pytest.importorskip("vs_trl")
    shape = LlamaShape(hidden=16, intermediate=24, layers=2, heads=4, kv_heads=2, vocab=50, tied=False)
    policy, reference = _llama(shape), _llama(shape).requires_grad_(False)
    examples = [
        {"prompt_ids": [1, 2, 3, 4], "response_ids": [[5, 6], [7, 8, 9]], "pairs": [(0, 1)]},
        {"prompt_ids": [1, 2], "response_ids": [[5], [6, 7]], "pairs": [(1, 0)]},
    ]
    batch = PreferenceCollator(pad_token_id=0, share_prompt=True)(examples)
    recorded = vs_trl.lit_align_passes("dpo", batch)
    assert [p.trained for p in recorded] == [True, False] and recorded[0].head_positions == 8
    with FlopCounterMode(display=False) as counter:
        response_logps(policy, batch).sum().backward()
        with torch.no_grad():
            response_logps(reference, batch)
    assert counter.get_total_flops() == step_flops(shape, recorded)


def test_recorded_generation_and_scoring_passes_match_torch_flop_counter(monkeypatch):
    """vs_trl.py's PassRecorder (the on-policy cases' MFU) on a Hugging Face Llama: greedy ``generate`` on a
    left-padded batch (a prefill, then decoding steps over the growing key/value cache, logits at the last position
    only), then a trained pass through lit_align's tiled log-prob head over the result. The FLOPs of the passes it
    recorded equal FlopCounterMode's count of the same work, and the decoding steps see their cache grow."""
    import lit_align.forward

    vs_trl = pytest.importorskip("vs_trl")
    monkeypatch.setattr(lit_align.forward, "linear_log_probs", lit_align.forward.linear_log_probs)  # restored after
    shape = LlamaShape(hidden=16, intermediate=24, layers=2, heads=4, kv_heads=2, vocab=50, tied=False)
    model = _llama(shape)
    recorder = vs_trl.PassRecorder()
    recorder.attach(model)
    recorder.wrap_log_probs()
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    ids[1, :2] = 0
    recorder.begin()
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
        hidden = model.model(input_ids=out).last_hidden_state[:, :-1].reshape(-1, shape.hidden)
        lit_align.forward.linear_log_probs(hidden, model.lm_head.weight, out[:, 1:].reshape(-1), None).sum().backward()
    recorder.end()
    (passes,) = recorder.steps
    decoder = [p for p in passes if p.body]
    assert [(p.rows, p.length, p.context, p.trained) for p in decoder] == [
        (3, 6, 0, False), (3, 1, 6, False), (3, 1, 7, False), (3, 1, 8, False), (3, 10, 0, True)
    ]  # fmt: skip
    assert counter.get_total_flops() == step_flops(shape, passes)
