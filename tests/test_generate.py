"""Sampling from a trained policy (issue 15): ``lit_align.generate`` (greedy against a hand-written greedy loop,
keyed sampling independent of the batch size and reproducible for a seed, chat rendering, end-of-turn stops),
``lit-align generate`` on an export written in the test (prompts from the command line and from a file, the reward
model's score, a bad row named), ``lit-align predict`` writing predictions.jsonl, and ``lit-align test`` on an
export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, gpt2_style_tokenizer

from lit_align import RewardModule, SFTModule
from lit_align.cli import run
from lit_align.data.sources import DataError
from lit_align.generate import (
    _parser,
    encode_prompts,
    generate,
    generate_ids,
    load_policy,
    main,
    render_prompts,
    stop_token_ids,
)
from lit_align.modules.reward import RewardScorer

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Hi"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A policy and a reward model exported as Hugging Face directories (``export_hf``): the tiny policy with its
    unembedding scaled, so that its greedy outputs differ from the untrained preset's."""
    root = tmp_path_factory.mktemp("exports")
    policy = SFTModule()
    policy.configure_model()
    with torch.no_grad():
        policy.model.lm_head.weight.mul_(3.0)
    policy.export_hf(root / "policy")
    reward = RewardModule()
    reward.configure_model()
    reward.reward_offset.fill_(0.25)
    reward.export_hf(root / "rm")
    return {"policy": root / "policy", "rm": root / "rm", "module": policy}


@pytest.fixture(scope="module")
def policy(exports):
    return load_policy(str(exports["policy"]))


def test_load_policy_loads_the_export_in_eval_mode_with_its_weights(exports, policy):
    model, tokenizer = policy
    assert not model.training
    torch.testing.assert_close(model.lm_head.weight, exports["module"].model.lm_head.weight)
    assert tokenizer.chat_template is not None


def test_greedy_equals_a_hand_written_greedy_loop(policy):
    """Greedy decoding (temperature 0) of each prompt, batched with left padding, equals argmax decoding by full
    forwards of that prompt alone, cut before the first EOS."""
    model, tokenizer = policy
    out = generate_ids(model, tokenizer, encode_prompts(tokenizer, PROMPTS), max_new_tokens=8, batch_size=3)
    for ids, (completion,) in zip(encode_prompts(tokenizer, PROMPTS), out):
        expected, seq = [], torch.tensor([ids])
        with torch.no_grad():
            for _ in range(8):
                token = int(model(input_ids=seq).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                expected.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], 1)
        assert completion == expected


def test_prompts_are_tokenized_as_in_training_with_one_bos(policy):
    """A plain prompt gets the tokenizer's BOS once; a chat rendered by the template (which writes BOS itself) does
    not get a second one."""
    _, tokenizer = policy
    chat = render_prompts(tokenizer, [[{"role": "user", "content": "Hi"}]])[0]
    plain, rendered = encode_prompts(tokenizer, ["Hi", chat])
    assert plain == tokenizer("Hi")["input_ids"] and plain[0] == tokenizer.bos_token_id
    assert rendered[0] == tokenizer.bos_token_id and rendered[1] != tokenizer.bos_token_id


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completions_do_not_depend_on_the_batch_size(policy, temperature):
    """Greedy and keyed sampling (2 samples a prompt) give the same completions with 1 or 3 prompts a batch."""
    model, tokenizer = policy
    kwargs = dict(max_new_tokens=6, temperature=temperature, num_samples=2, seed=7)
    one = generate(model, tokenizer, PROMPTS, batch_size=1, **kwargs)
    three = generate(model, tokenizer, PROMPTS, batch_size=3, **kwargs)
    assert one == three and all(len(samples) == 2 for samples in one)
    if temperature == 0:
        assert all(a == b for a, b in one)  # greedy: the samples of a prompt are one completion
    else:
        assert any(a != b for a, b in one)  # sampled: its own seed each


def test_sampling_is_reproducible_for_a_seed_and_changes_with_it(policy):
    model, tokenizer = policy
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_p=0.9)
    first = generate(model, tokenizer, PROMPTS, seed=1, **kwargs)
    assert generate(model, tokenizer, PROMPTS, seed=1, **kwargs) == first
    assert generate(model, tokenizer, PROMPTS, seed=2, **kwargs) != first


def test_render_prompts_modes(policy):
    """``None``: chats rendered with the generation prompt, text kept; ``True``: text wrapped as a user turn;
    ``False``: a chat refused; a trailing assistant turn is dropped; a malformed chat names the prompt and field."""
    _, tokenizer = policy
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert expected.endswith("<|assistant|>\n")
    assert render_prompts(tokenizer, ["Hi", chat]) == ["Hi", expected]
    replied = [*chat, {"role": "assistant", "content": "Hello"}]
    assert render_prompts(tokenizer, [replied]) == [expected]
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                            add_generation_prompt=True)  # fmt: skip
    assert render_prompts(tokenizer, ["Hi"], chat_template=True) == [wrapped]
    with pytest.raises(ValueError, match="prompt 1 is a chat"):
        render_prompts(tokenizer, ["Hi", chat], chat_template=False)
    with pytest.raises(DataError, match=r"prompt 0, field 'messages\[0\].role'"):
        render_prompts(tokenizer, [[{"role": "robot", "content": "Hi"}]])


def test_the_chat_templates_end_of_turn_token_stops_a_completion():
    """ChatML ends an assistant turn with ``<|im_end|>``, not EOS: both stop a completion."""
    tokenizer = gpt2_style_tokenizer()
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    tiny = load_policy("tiny")[1]
    assert stop_token_ids(tiny) == [tiny.eos_token_id]  # its template ends a turn with EOS itself


# ----- lit-align generate ----------------------------------------------------------------------------------------
def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_command_with_prompts_on_the_command_line(exports, policy, tmp_path, capsys):
    """``lit-align generate --model <export> --prompt A --prompt B --output F``: one JSON line per prompt with the
    prompt, the sample index and the greedy completion the API gives."""
    out = tmp_path / "out.jsonl"
    args = ["--model", str(exports["policy"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max_new_tokens",
            "6", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = _lines(out)
    expected = generate(*policy, PROMPTS[:2], max_new_tokens=6)
    assert rows == [{"prompt": p, "completion": c[0], "sample": 0} for p, c in zip(PROMPTS[:2], expected)]
    assert str(out) in capsys.readouterr().err
    assert _parser().parse_args(args).trust_remote_code is False  # the model's own code runs only when asked


def test_generate_command_with_a_prompts_file_and_a_reward_model(exports, policy, tmp_path, capsys):
    """``--prompts`` JSONL rows with ``prompt``, ``messages`` (rendered with the chat template) and ``question``,
    2 samples each at temperature 1, scored with ``--reward_model``: each line's reward is RewardScorer's score of
    the rendered prompt and the completion; without ``--output`` the lines go to standard output."""
    chat = [{"role": "user", "content": "Name a colour."}]
    rows_in = [{"prompt": PROMPTS[0]}, {"messages": chat}, {"question": "What is 2 + 2?", "answer": "4"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    args = ["--model", str(exports["policy"]), "--prompts", str(prompts), "--reward_model", str(exports["rm"]),
            "--num_samples", "2", "--temperature", "1.0", "--max_new_tokens", "6", "--batch_size", "2"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p, k) for p in (PROMPTS[0], chat, rows_in[2]["question"])
                                                          for k in (0, 1)]  # fmt: skip
    model, tokenizer = policy
    rendered = render_prompts(tokenizer, [PROMPTS[0], chat, rows_in[2]["question"]])
    assert rendered[1].startswith("<s><|user|>\nName a colour.") and rendered[1].endswith("<|assistant|>\n")
    expected = generate(model, tokenizer, rendered, max_new_tokens=6, temperature=1.0, num_samples=2)
    assert [r["completion"] for r in rows] == [c for samples in expected for c in samples]
    scorer = RewardScorer.from_pretrained(exports["rm"])
    assert float(scorer.offset) == 0.25
    scores = scorer.score([rendered[i // 2] for i in range(6)], [r["completion"] for r in rows]).tolist()
    assert all(isinstance(r["reward"], float) and math.isfinite(r["reward"]) for r in rows)
    assert [r["reward"] for r in rows] == pytest.approx(scores, abs=1e-5)


def test_generate_command_names_a_bad_row(exports, tmp_path, capsys):
    """A row without a prompt field, a prompt that is not text, and a missing ``--prompt_field``: exit status 2 and
    one error line naming the file, the row and the field."""
    bad = tmp_path / "bad.jsonl"
    for rows, extra, expected in [
        ([{"prompt": "ok"}, {"answer": "4"}], [], "row 2: has fields ['answer']; expected one of"),
        ([{"prompt": "ok"}, {"prompt": 3}], [], "row 2, field 'prompt': must be a string, got int"),
        ([{"prompt": "ok"}], ["--prompt_field", "input"], "row 1, field 'input': is missing (--prompt_field input)"),
    ]:
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main(["--model", str(exports["policy"]), "--prompts", str(bad), *extra]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("lit-align generate: error: ") and f"{bad}, {expected}" in error, error
    assert main(["--model", str(tmp_path / "no" / "such" / "dir"), "--prompt", "Hi"]) == 2
    assert "no such directory" in capsys.readouterr().err


# ----- lit-align predict and test --------------------------------------------------------------------------------
def test_predict_subcommand_writes_one_line_per_held_out_prompt(tmp_path, capsys):
    """``lit-align predict -c configs/sft.yaml``: the policy's greedy completion of every held-out prompt, written
    to ``<default_root_dir>/predictions.jsonl`` (the prompt decoded from the held-out example's prompt tokens)."""
    cli = run(["predict", "-c", str(REPO / "configs" / "sft.yaml"), f"--trainer.default_root_dir={tmp_path}",
               "--trainer.logger=false", *QUIET])  # fmt: skip
    held_out = cli.datamodule.val_dataset
    rows = _lines(tmp_path / "predictions.jsonl")
    assert len(rows) == len(held_out) > 0
    assert all(set(r) == {"prompt", "completion"} and isinstance(r["completion"], str) for r in rows)
    assert all(r["prompt"].endswith("### Response:\n") for r in rows), rows[0]["prompt"]


def test_predict_subcommand_keeps_a_configured_prediction_writer(tmp_path):
    """A ``BasePredictionWriter`` named in the config (here lit_align's own, to another file) replaces the default
    one: no predictions.jsonl is written beside it."""
    mine = tmp_path / "mine.jsonl"
    run(["predict", "-c", str(REPO / "configs" / "sft.yaml"), f"--trainer.default_root_dir={tmp_path}",
         "--trainer.logger=false", "--trainer.limit_predict_batches=1", *QUIET,
         "--trainer.callbacks+=lit_align.generate.PredictionsWriter", f"--trainer.callbacks.path={mine}"])  # fmt: skip
    assert len(_lines(mine)) > 0 and not (tmp_path / "predictions.jsonl").exists()


def test_predict_subcommand_scores_held_out_pairs_with_a_reward_model(tmp_path):
    """``lit-align predict -c configs/reward.yaml`` (one batch): one line per held-out pair with both responses and
    their rewards, the chosen's as the module scores it."""
    cli = run(["predict", "-c", str(REPO / "configs" / "reward.yaml"), f"--trainer.default_root_dir={tmp_path}",
               "--trainer.logger=false", "--trainer.limit_predict_batches=1", *QUIET])  # fmt: skip
    rows = _lines(tmp_path / "predictions.jsonl")
    assert rows and all(set(r) == {"prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"} for r in rows)
    assert all(math.isfinite(r["reward_chosen"]) and math.isfinite(r["reward_rejected"]) for r in rows)
    scorer = RewardScorer(cli.model.model, cli.model.tokenizer)
    first = rows[0]
    torch.testing.assert_close(scorer.score([first["prompt"]], [first["chosen"]]).item(), first["reward_chosen"],
                               atol=1e-4, rtol=0)  # fmt: skip


def test_test_subcommand_on_an_export(exports, tmp_path):
    """``lit-align test -c configs/sft.yaml --model.init_args.model <export>`` reports finite held-out metrics."""
    cli = run(["test", "-c", str(REPO / "configs" / "sft.yaml"), "--model.init_args.model", str(exports["policy"]),
               f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.limit_test_batches=1",
               *QUIET])  # fmt: skip
    logged = cli.trainer.callback_metrics
    assert {"test/loss", "test/ppl", "test/token_acc"} <= set(logged)
    assert all(math.isfinite(float(logged[k])) for k in ("test/loss", "test/ppl", "test/token_acc"))


def test_reward_module_predict_step_scores_the_responses_of_instruction_data(tiny_tokenizer):
    """A reward model's ``predict_step`` on a batch of responses (InstructionDataModule's predict loader): one row per
    example with its prompt, its response and the reward RewardScorer gives them (offset subtracted)."""
    from lit_align.data import InstructionDataModule

    data = InstructionDataModule(tiny_tokenizer, max_length=512, batch_size=4)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    module = RewardModule()
    module.configure_model()
    module.reward_offset.fill_(0.5)
    module.eval()
    rows = module.predict_step(batch, 0)
    assert len(rows) == 4 and all(set(r) == {"prompt", "response", "reward"} for r in rows)
    scores = RewardScorer(module.model, tiny_tokenizer, offset=0.5).score([r["prompt"] for r in rows],
                                                                          [r["response"] for r in rows])  # fmt: skip
    assert [r["reward"] for r in rows] == pytest.approx(scores.tolist(), abs=1e-4)
