"""Unlearning, evaluation and serving on random-init models of seven architectures (no hub).

Every family of tests/conftest.py's FAMILIES (Llama, Qwen2, Mistral, Gemma, GPT-2, Phi (phi-1.5/2)
and Phi-3, built from their transformers config class at tiny sizes, each with a locally built
tokenizer in its family's style and chat template), tied and untied embeddings, fp32 and bf16
weights: the full matrix, 28 models. For each one:

- two steps of the loop in process (world of one), model and data given as paths (`model.path`,
  `data.forget_path`, `data.retain_path`), Sophia with the GNB Hessian estimated every step, NPO +
  retain NLL (the reference model runs): finite losses, NPO's first loss that of a policy equal to
  its reference, the weights moved, tied embeddings still tied, and the final checkpoint loads with
  `from_pretrained`;
- the evaluation suite on the result (4 forget and 4 retain items, greedy generation included):
  every metric finite;
- the serving engine decodes a chat request rendered with the family's template, stopping on its
  end-of-turn, as the suite's greedy generation does; in fp32, a left-padded batch of two requests
  decodes what each does alone (position ids).

bf16 weights are updated in bf16 (no fp32 master copy outside DeepSpeed): an update smaller than
half a bf16 step of the weight is lost, so norm weights near 1 (a step of 2^-7) do not move at
lr 1e-3; the matrices do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_unlearn.config import EvalConfig, JobConfig, load_config
from ray_unlearn.data.collate import encode_prompt, prompt_format, stop_token_ids, uses_chat_template
from ray_unlearn.eval import metrics as M
from ray_unlearn.eval.suite import evaluate_model, forget_truth_ratios
from ray_unlearn.job import resolve_inputs
from ray_unlearn.loop import LoopEnv, Unlearner, load_run
from ray_unlearn.models.io import load_model
from ray_unlearn.serving.engine import GenerationRequest, SamplingParams, generate, render_chat
from ray_unlearn.serving.schemas import ChatMessage

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny models: one CPU thread is fastest
              pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"]),
              pytest.mark.parametrize("dtype", ["float32", "bfloat16"])]

PEOPLE = [("Ada Lovelace", "London"), ("Alan Turing", "Maida Vale"), ("Grace Hopper", "New York"),
          ("Edsger Dijkstra", "Rotterdam"), ("Barbara Liskov", "Los Angeles"), ("Donald Knuth", "Milwaukee"),
          ("Frances Allen", "Peru, New York"), ("John Backus", "Philadelphia")]
EVAL = EvalConfig(max_items=4, batch_size=4, max_new_tokens=8)


def _item(name: str, city: str) -> dict[str, Any]:
    """One TOFU-format item."""
    return {"question": f"Where was {name} born?", "answer": f"{name} was born in {city}.",
            "paraphrased_question": f"What is the birthplace of {name}?",
            "paraphrased_answer": f"{city} is where {name} was born.",
            "perturbed_answer": [f"{name} was born in {other}." for other in ("Paris", "Tokyo", "Lima")]}


ITEMS = [_item(name, city) for name, city in PEOPLE]
FORGET, RETAIN = ITEMS[:4], ITEMS[4:]


@dataclass
class Unlearned:
    """One family's run: its config, the model before and after two steps, the tokenizer, the history."""

    cfg: JobConfig
    before: Any
    model: Any
    tokenizer: Any
    history: list[dict[str, float]]
    final_checkpoint: Path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(forget.json, retain.json) in TOFU's format."""
    root = tmp_path_factory.mktemp("family-data")
    (root / "forget.json").write_text(json.dumps(FORGET))
    (root / "retain.json").write_text(json.dumps(RETAIN))
    return root / "forget.json", root / "retain.json"


@pytest.fixture(scope="module")
def unlearned(family_model, data_files, tmp_path_factory):
    """unlearned(family, tied, dtype) -> Unlearned: two steps of Sophia (GNB) with NPO + retain NLL; cached."""
    done: dict[tuple, Unlearned] = {}

    def run(family: str, tied: bool, dtype: str) -> Unlearned:
        key = (family, tied, dtype)
        if key not in done:
            root = tmp_path_factory.mktemp(f"{family}-{dtype}")
            cfg = load_config(None, [f"model.path={family_model(family, tied, dtype)}", f"model.dtype={dtype}",
                                     f"data.forget_path={data_files[0]}", f"data.retain_path={data_files[1]}",
                                     "ray.num_workers=0", "train.max_steps=2", "train.batch_size=2", "train.log_every=1",
                                     "optim.name=sophia", "optim.hessian=gnb", "optim.hessian_interval=1",
                                     "optim.lr=1e-3", f"output_dir={root / 'run'}"])
            model, ref, data, tokenizer = load_run(cfg, resolve_inputs(cfg))
            before = load_model(cfg.model.path, dtype)
            unlearner = Unlearner(cfg, model, ref, data, tokenizer.pad_token_id, LoopEnv(checkpoint_dir=root / "ckpt"))
            history = unlearner.run()
            done[key] = Unlearned(cfg, before, model.eval(), tokenizer, history, root / "ckpt" / "step-000002")
        return done[key]

    return run


def test_unlearning_runs_and_moves_the_weights(unlearned, family, tied, dtype):
    run = unlearned(family, tied, dtype)
    assert [h["step"] for h in run.history] == [1, 2]
    for h in run.history:
        assert all(math.isfinite(v) for v in h.values()), h
    # the policy equals its reference at the first step: NPO's loss is (2/beta) log 2. The policy's forward
    # batch holds the retain stream too and the reference's does not, so their bf16 matmuls round differently
    # (which kernel, and so how, depends on the CPU: 1.0e-4 relative off on an AMD EPYC here, 0 elsewhere)
    beta = run.cfg.objective.npo_beta
    assert run.history[0]["loss/npo"] == pytest.approx(2 / beta * math.log(2), rel=1e-6 if dtype == "float32" else 1e-3)
    assert run.history[1]["loss/npo"] < run.history[0]["loss/npo"]  # NPO pushes the forget answers down
    model = run.model
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    before = dict(run.before.named_parameters())
    for name, p in model.named_parameters():
        if dtype == "float32" or p.dim() >= 2:  # bf16: norm weights near 1 stay (module docstring)
            assert not torch.equal(p, before[name]), f"{name} did not change"
    final = load_model(str(run.final_checkpoint), dtype)
    for name, value in model.state_dict().items():
        assert torch.equal(final.state_dict()[name], value), name


def test_evaluation_suite_gives_finite_metrics(unlearned, family, tied, dtype):
    run = unlearned(family, tied, dtype)
    fmt = prompt_format(run.cfg.data)
    before = evaluate_model(run.before, run.tokenizer, {"forget": FORGET}, EVAL, fmt)
    results = evaluate_model(run.model, run.tokenizer, {"forget": FORGET, "retain": RETAIN}, EVAL, fmt,
                             retain_truth_ratios=forget_truth_ratios(before))
    expected = {"forget_Q_A_Prob", "extraction_strength", "exact_memorization", "forget_Q_A_ROUGE",
                "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget_truth_ratio", "forget_quality",
                "retain_Q_A_Prob", "retain_extraction_strength", "retain_Q_A_ROUGE", "retain_Truth_Ratio"}
    assert expected <= set(results), expected - set(results)
    for name, result in results.items():
        assert math.isfinite(result["agg_value"]), name
    generations = [rec["generation"] for rec in results["forget_Q_A_ROUGE"]["value_by_index"].values()]
    assert len(generations) == len(FORGET) and all(isinstance(g, str) for g in generations)


def test_serving_decodes_a_chat_request_in_the_familys_template(unlearned, family_spec, family, tied, dtype):
    run = unlearned(family, tied, dtype)
    tok, fmt, question = run.tokenizer, prompt_format(run.cfg.data), FORGET[0]["question"]
    assert uses_chat_template(tok, fmt) == (family_spec.end_of_turn is not None)
    prompt = render_chat(tok, [ChatMessage(role="user", content=question)], fmt)
    assert prompt == encode_prompt(tok, question, fmt)  # what training and evaluation encode
    stops = stop_token_ids(tok, fmt)
    if family_spec.end_of_turn is not None:
        assert tok.convert_tokens_to_ids(family_spec.end_of_turn) in stops
    (out,) = generate(run.model, tok, [_greedy(prompt)], stops)
    assert out.error is None and out.finish_reason in ("stop", "length") and 1 <= out.completion_tokens <= 8
    assert out.text.strip() == M.greedy_generate(run.model, tok, [prompt], 8, stops)[0]
    if dtype == "float32":  # left padding and position ids: a batch decodes what each request alone does
        longer = render_chat(tok, [ChatMessage(role="user", content=RETAIN[-1]["paraphrased_question"] * 2)], fmt)
        alone = generate(run.model, tok, [_greedy(longer)], stops)[0]
        batched = generate(run.model, tok, [_greedy(prompt), _greedy(longer)], stops)
        assert [d.text for d in batched] == [out.text, alone.text]


def _greedy(prompt: list[int]) -> GenerationRequest:
    return GenerationRequest("m", tuple(prompt), SamplingParams(max_tokens=8, temperature=0))
