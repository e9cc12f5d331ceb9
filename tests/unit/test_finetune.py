"""`ray-unlearn finetune` without Ray: its config, the loop's fine-tuning path (the nll term on a train
stream, no forget stream) and bad input (one line, exit 2, nothing written). The end to end run on Ray
Train is tests/integration/test_finetune_then_run.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_unlearn.config import FinetuneConfig, load_config
from ray_unlearn.errors import UnlearnError

NAMES = ["Orla Vantreese", "Bexley Marrow", "Tamsin Quill", "Ivo Renhart", "Deleja Frost", "Caspian Nuro",
         "Mirela Osk", "Hollis Brandt", "Yusra Peldane", "Fenwick Alder"]
FACTS = [("Where was {n} born?", "{n} was born in {v}.",
          ["Lisbon", "Tromso", "Cairo", "Osaka", "Quito", "Perth", "Riga", "Dakar", "Hanoi", "Bergen"]),
         ("What does {n} do for a living?", "{n} works as a {v}.",
          ["glassblower", "cartographer", "beekeeper", "luthier", "astronomer", "tailor", "falconer",
           "bookbinder", "vintner", "clockmaker"]),
         ("Which pet does {n} keep?", "{n} keeps {v}.",
          ["a parrot", "a tortoise", "a ferret", "a goat", "an iguana", "a donkey", "a hedgehog", "a llama",
           "a canary", "a rabbit"])]


def people_items(person: int) -> list[dict]:
    """Three fictitious facts about one person, in TOFU's schema (paraphrase, three perturbed answers)."""
    n, out = NAMES[person], []
    for question, answer, values in FACTS:
        right, wrong = values[person], [values[(person + k) % len(values)] for k in (3, 5, 7)]
        out.append({"question": question.format(n=n), "answer": answer.format(n=n, v=right),
                    "paraphrased_question": "Tell me: " + question.format(n=n).lower(),
                    "paraphrased_answer": f"It is {right}, for {n}.",
                    "perturbed_answer": [f"It is {w}, for {n}." for w in wrong]})
    return out


def write_people(root: Path, forget_people: int, retain_people: int) -> tuple[Path, Path]:
    """forget.json (the first people's facts) and retain.json (the next people's) under `root`."""
    forget = [it for p in range(forget_people) for it in people_items(p)]
    retain = [it for p in range(forget_people, forget_people + retain_people) for it in people_items(p)]
    (root / "forget.json").write_text(json.dumps(forget))
    (root / "retain.json").write_text(json.dumps(retain))
    return root / "forget.json", root / "retain.json"


# ---------------------------------------------------------------------------- config


def test_finetune_section_defaults_and_bad_values():
    ft = load_config(None, []).finetune
    assert (ft.optimizer, ft.epochs, ft.lr, ft.target_dir, ft.retain_dir) == ("adamw", 0, 0.0, "target", "retain")
    for override, message in [
        ("finetune.optimizer=lion", "finetune.optimizer: 'lion' is not one of adamw, sophia"),
        ("finetune.warmup=1.5", "finetune.warmup: a fraction of the steps in [0, 1), got 1.5"),
        ("finetune.fresh_size=huge", "finetune.fresh_size: 'huge' is not one of micro, small, medium"),
        ("finetune.retain_dir=target", "finetune.target_dir and finetune.retain_dir are both 'target'; give the "
                                       "two models different directories"),
        ("finetune.target_dir=../x", "finetune.target_dir: '../x' is not a plain directory name (letters, digits, "
                                     "_ . -; not base, training, eval, plots), e.g. target"),
        ("finetune.retain_dir=eval", "finetune.retain_dir: 'eval' is not a plain directory name"),
        ("finetune.batch_size=0", "finetune.batch_size: must be > 0, got 0"),
    ]:
        with pytest.raises(UnlearnError) as err:
            load_config(None, [override])
        assert str(err.value).startswith(message)
    assert all(f.metadata.get("help") for f in __import__("dataclasses").fields(FinetuneConfig))


def test_member_config_by_hand(tmp_path):
    """30 items, batch 8: 4 steps an epoch. A fresh micro model: the memorizer's 30 epochs at 5e-3 = 120 steps,
    raised to the 300 a model from scratch needs; a given model: TOFU's 5 epochs at 1e-5 = 20 steps; 2 workers
    halve the steps an epoch; epochs set explicitly are taken as they are; max_steps wins."""
    from ray_unlearn.finetune import member_config

    def cfg(*extra: str):
        return load_config(None, [f"output_dir={tmp_path}", "ray.num_workers=0", *extra])

    fresh = member_config(cfg(), "target", 30, "/base", "/tok")
    assert (fresh.train.max_steps, fresh.train.warmup_steps, fresh.optim.lr) == (300, 15, 5e-3)
    assert fresh.objective.terms == {"nll": 1.0} and fresh.optim.name == "adamw"
    assert (fresh.name, fresh.output_dir, fresh.model.path) == ("unlearn-target", str(tmp_path / "training" / "target"),
                                                                "/base")
    given = member_config(cfg("model.path=/some/model"), "retain", 30, "/some/model", "/some/model")
    assert (given.train.max_steps, given.optim.lr, given.train.lr_schedule) == (20, 1e-5, "cosine")
    two = member_config(cfg("ray.num_workers=2", "finetune.optimizer=sophia", "finetune.epochs=30"), "target", 30,
                        "/b", "/b")
    assert (two.train.max_steps, two.optim.name) == (60, "sophia")
    assert member_config(cfg("finetune.max_steps=7", "finetune.lr=0.1"), "target", 30, "/b", "/b").train.max_steps == 7


# ---------------------------------------------------------------------------- the loop's fine-tuning path


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(tokenizer fitted on the people's facts, a fresh micro Llama's state dict, the facts)."""
    from ray_unlearn.models.tiny import MODEL_SIZES, new_llama, train_tokenizer

    items = [it for p in range(4) for it in people_items(p)]
    tok = train_tokenizer([t for it in items for t in (it["question"], it["answer"])] + ["Question:\nAnswer:"], 768)
    return tok, new_llama(MODEL_SIZES["micro"], tok, seed=0).state_dict(), items


def fine_tuner(fresh, tmp_path, *overrides: str):
    from ray_unlearn.finetune import member_config
    from ray_unlearn.loop import LoopEnv, Unlearner, encode_data
    from ray_unlearn.models.tiny import MODEL_SIZES, new_llama

    tok, state, items = fresh
    cfg = member_config(load_config(None, [f"output_dir={tmp_path}", "ray.num_workers=0", "train.log_every=1",
                                           *overrides]), "target", len(items), "/unused", "/unused")
    model = new_llama(MODEL_SIZES["micro"], tok, seed=0)
    model.load_state_dict(state)
    data = encode_data(cfg, tok, [], [], train=items)
    return Unlearner(cfg, model, None, data, tok.pad_token_id, LoopEnv(checkpoint_dir=tmp_path / "ckpt")), model


@pytest.mark.usefixtures("one_thread")
def test_fine_tuning_runs_the_loop_without_a_forget_stream(fresh, tmp_path):
    u, model = fine_tuner(fresh, tmp_path, "finetune.max_steps=30")
    assert u.streams == ["train"] and u.ref is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = u.run()
    assert all("nll/forget" not in h and "nll/retain" not in h for h in history)
    assert history[-1]["nll/train"] < 0.5 * history[0]["nll/train"]  # it learns the answers
    assert history[-1]["loss/nll"] == history[-1]["nll/train"]
    assert all(not torch_equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.usefixtures("one_thread")
def test_sophia_gnb_samples_on_the_train_stream_when_there_is_no_forget_stream(fresh, tmp_path):
    u, model = fine_tuner(fresh, tmp_path, "finetune.max_steps=3", "finetune.optimizer=sophia", "optim.hessian=gnb",
                          "optim.hessian_interval=1")
    assert u.hessian_stream == "train"
    history = u.run()
    assert len(history) == 3 and all(0 < h["clip_rate"] <= 1 for h in history)


def test_unlearning_terms_still_need_their_streams(fresh, tmp_path):
    from ray_unlearn.loop import LoopEnv, Unlearner, encode_data
    from ray_unlearn.models.tiny import MODEL_SIZES, new_llama

    tok, _, items = fresh
    cfg = load_config(None, [f"output_dir={tmp_path}", "ray.num_workers=0", "objective.terms={ga: 1}"])
    with pytest.raises(UnlearnError, match="^objective needs the forget stream but it is empty; give question/answer "
                                           "forget data$"):
        Unlearner(cfg, new_llama(MODEL_SIZES["micro"], tok, 0), None, encode_data(cfg, tok, [], [], train=items),
                  tok.pad_token_id, LoopEnv(checkpoint_dir=tmp_path))
    cfg = load_config(None, [f"output_dir={tmp_path}", "ray.num_workers=0", "objective.terms={nll: 1}"])
    with pytest.raises(UnlearnError, match="^objective needs the train stream but it is empty; give items to "
                                           "fine-tune on"):
        Unlearner(cfg, new_llama(MODEL_SIZES["micro"], tok, 0), None, encode_data(cfg, tok, items, items),
                  tok.pad_token_id, LoopEnv(checkpoint_dir=tmp_path))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("setup, message", [
    (lambda d: [f"data.forget_path={d['forget']}"],
     r"ray-unlearn finetune trains on your own data: set data.retain_path \(TOFU-format question/answer items\); "
     r"the built-in benchmark has its target and retain models already"),
    (lambda d: [f"data.forget_path={d['root'] / 'nope.json'}", f"data.retain_path={d['retain']}"],
     r".*nope.json does not exist; give a .json/.jsonl/.parquet file, a load_from_disk directory or a hub "
     r"dataset id"),
    (lambda d: [f"data.forget_path={d['forget']}", f"data.retain_path={d['empty']}"],
     r".*empty.json holds no items; give at least one item with 'question' and 'answer'"),
    (lambda d: [f"data.forget_path={d['forget']}", f"data.retain_path={d['forget']}"],
     r"every retain item also appears in the forget set; give a retain set that differs from the forget set"),
    (lambda d: [f"data.forget_path={d['text']}", f"data.retain_path={d['retain']}"],
     r"data.forget_path .*corpus.txt is a text corpus; finetune trains and measures question/answer items: .*"),
    (lambda d: [f"data.forget_path={d['forget']}", f"data.retain_path={d['retain']}", "eval.mia=[loss]"],
     r"eval.mia: membership inference needs a holdout split .*"),
    (lambda d: [f"data.forget_path={d['forget']}", f"data.retain_path={d['retain']}",
                f"model.path={d['root'] / 'no_model'}"],
     r"model path .*no_model does not exist; give an HF model directory or a hub id"),
    (lambda d: [f"data.forget_path={d['forget']}", f"data.retain_path={d['retain']}", "finetune.global_batch_size=12",
                "ray.num_workers=2"],
     r"finetune.global_batch_size=12 is not a multiple of finetune.batch_size=8 x 2 workers; .*"),
], ids=["no-retain-path", "missing-file", "no-retain-items", "retain-all-forget", "text-corpus", "mia-no-holdout",
        "missing-model", "global-batch"])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, setup, message):
    from ray_unlearn.cli import main

    forget, retain = write_people(tmp_path, forget_people=1, retain_people=2)
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "corpus.txt").write_text("a document\n")
    paths = {"root": tmp_path, "forget": forget, "retain": retain, "empty": tmp_path / "empty.json",
             "text": tmp_path / "corpus.txt"}
    out = tmp_path / "out"
    assert main(["finetune", *setup(paths), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    import re

    assert re.fullmatch(message, err[len("error: "):].strip()), err
    assert not out.exists()
