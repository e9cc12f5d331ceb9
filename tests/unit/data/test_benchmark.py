"""The built-in fictitious-entity benchmark: determinism, schema, split structure, files."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from ray_unlearn.data.benchmark import (ATTRIBUTES, NUM_PERTURBED, SIZES, SPLITS, generate_benchmark,
                                        neighbour_items, read_benchmark, training_corpus, write_benchmark)
from ray_unlearn.errors import UnlearnError

ITEM_FIELDS = {"index": int, "entity": str, "attribute": str, "value": str, "question": str, "answer": str,
               "paraphrased_question": str, "paraphrased_answer": str, "perturbed_answer": list,
               "keywords": list}
ENTITY_SPLITS = ("forget01", "forget05", "forget10", "retain", "holdout", "neighbours")


@pytest.fixture(scope="module", params=list(SIZES))
def bench(request):
    return generate_benchmark(request.param, seed=0)


def entities(items):
    return {it["entity"] for it in items}


def digest(splits):
    return hashlib.sha256(json.dumps(splits).encode()).hexdigest()


def test_same_seed_is_identical_and_other_seed_differs():
    assert digest(generate_benchmark("micro", 0)) == digest(generate_benchmark("micro", 0))
    assert digest(generate_benchmark("micro", 0)) != digest(generate_benchmark("micro", 1))


def test_output_does_not_depend_on_hash_seed():
    code = ("import hashlib, json; from ray_unlearn.data.benchmark import generate_benchmark; "
            "print(hashlib.sha256(json.dumps(generate_benchmark('micro', 3)).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(generate_benchmark("micro", 3))


def test_unknown_size_names_the_valid_ones():
    with pytest.raises(UnlearnError, match="micro, small, medium"):
        generate_benchmark("huge")


def test_every_split_present_and_non_empty(bench):
    assert list(bench) == list(SPLITS)
    assert all(bench[split] for split in SPLITS)


def test_item_schema(bench):
    for split, items in bench.items():
        for item in items:
            assert set(item) == set(ITEM_FIELDS), split
            for key, kind in ITEM_FIELDS.items():
                assert isinstance(item[key], kind), (split, key)
            assert len(item["perturbed_answer"]) >= 3 and all(isinstance(a, str) for a in item["perturbed_answer"])
            assert item["keywords"] and all(k in item["value"] for k in item["keywords"])
            assert len(item["answer"].split()) <= 20 and len(item["paraphrased_answer"].split()) <= 20


def test_index_unique_within_each_split(bench):
    for split, items in bench.items():
        indices = [it["index"] for it in items]
        assert len(indices) == len(set(indices)), split


def test_value_ends_answer_and_paraphrase(bench):
    for items in bench.values():
        for item in items:
            assert item["answer"].endswith(" " + item["value"] + ".")
            assert item["paraphrased_answer"].endswith(" " + item["value"] + ".")
            assert item["paraphrased_answer"] != item["answer"]
            assert item["paraphrased_question"] != item["question"]


def test_perturbed_answers_are_wrong_values_in_the_paraphrase_template(bench):
    for items in bench.values():
        for item in items:
            perturbed = item["perturbed_answer"]
            assert len(perturbed) == NUM_PERTURBED >= 3 and len(set(perturbed)) == len(perturbed)
            assert item["paraphrased_answer"] not in perturbed and item["answer"] not in perturbed
            stem = item["paraphrased_answer"][: -len(item["value"]) - 1]
            for wrong in perturbed:
                assert not wrong.endswith(" " + item["value"] + ".")
                # same template: only the value (and its article a/an) changes
                assert wrong.startswith(stem.removesuffix(" a ").removesuffix(" an "))


def test_forget_splits_nested_and_sized(bench):
    f01, f05, f10 = (entities(bench[s]) for s in ("forget01", "forget05", "forget10"))
    assert f01 <= f05 <= f10
    trained = len(f10) + len(entities(bench["retain"]))
    expected = [max(1, int(trained * frac + 0.5)) for frac in (0.01, 0.05, 0.10)]
    assert [len(f01), len(f05), len(f10)] == expected
    assert all(items_equal(bench[s], bench["forget10"]) for s in ("forget01", "forget05"))


def items_equal(subset, superset):
    by_index = {it["index"]: it for it in superset}
    return all(by_index[it["index"]] == it for it in subset)


def test_entity_groups_are_disjoint(bench):
    groups = [entities(bench[s]) for s in ("forget10", "retain", "holdout")]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert not entities(bench["world_facts"]) & set().union(*groups)


def test_sizes_match_spec():
    for size, spec in SIZES.items():
        b = generate_benchmark(size)
        assert len(entities(b["forget10"]) | entities(b["retain"])) == spec.num_entities
        assert len(entities(b["holdout"])) == spec.num_holdout_entities
        assert len(b["world_facts"]) == spec.num_world_facts
        assert len(b["retain"]) == len(entities(b["retain"])) * len(ATTRIBUTES)


def test_at_least_eight_attributes_per_entity(bench):
    assert len(ATTRIBUTES) >= 8
    for split in ("forget10", "retain", "holdout"):
        per_entity = {}
        for it in bench[split]:
            per_entity.setdefault(it["entity"], set()).add(it["attribute"])
        assert all(len(attrs) == len(ATTRIBUTES) >= 8 for attrs in per_entity.values())


def test_names_unique(bench):
    names = [it["entity"] for s in ("forget10", "retain", "holdout") for it in bench[s]
             if it["attribute"] == "birth_year"]
    assert len(names) == len(set(names))


def test_neighbours_share_a_value_with_forget10(bench):
    forget_values = {(it["attribute"], it["value"]) for it in bench["forget10"]}
    retain = {it["index"]: it for it in bench["retain"]}
    assert bench["neighbours"]
    for it in bench["neighbours"]:
        assert retain[it["index"]] == it
        assert (it["attribute"], it["value"]) in forget_values
    sharing = [it for it in bench["retain"] if (it["attribute"], it["value"]) in forget_values]
    assert len(bench["neighbours"]) == len(sharing)


@pytest.mark.parametrize("seed", range(20))
def test_neighbours_non_empty_for_any_seed(seed):
    assert generate_benchmark("micro", seed)["neighbours"]


def test_neighbour_items_of_a_smaller_forget_split(bench):
    near = neighbour_items(bench["retain"], bench["forget01"])
    assert {it["index"] for it in near} <= {it["index"] for it in bench["neighbours"]}


def test_world_facts_examples():
    facts = generate_benchmark("small")["world_facts"]
    kinds = {it["attribute"] for it in facts}
    assert {"sum", "capital", "opposite"} <= kinds
    sums = [it for it in facts if it["attribute"] == "sum"]
    x, _, y = sums[0]["entity"].split()
    assert sums[0]["value"] == str(int(x) + int(y))
    assert sums[0]["question"] == f"What is {x} plus {y}?"
    assert len({it["question"] for it in facts}) == len(facts)


def test_training_corpus_has_both_phrasings():
    b = generate_benchmark("micro")
    target, retain_only = training_corpus(b, include_forget=True), training_corpus(b, include_forget=False)
    assert len(target) == 2 * (len(b["forget10"]) + len(b["retain"]) + len(b["world_facts"]))
    assert len(retain_only) == 2 * (len(b["retain"]) + len(b["world_facts"]))
    pairs = {(r["question"], r["answer"]) for r in target}
    item = b["forget10"][0]
    assert (item["question"], item["answer"]) in pairs
    assert (item["paraphrased_question"], item["paraphrased_answer"]) in pairs
    assert (item["question"], item["answer"]) not in {(r["question"], r["answer"]) for r in retain_only}
    assert not {(it["question"], it["answer"]) for it in b["holdout"]} & pairs
    assert [r["index"] for r in target] == list(range(len(target)))


def test_write_read_round_trip(tmp_path):
    b = generate_benchmark("micro", seed=2)
    write_benchmark(b, tmp_path / "bench")
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == sorted(f"{s}.jsonl" for s in SPLITS)
    assert read_benchmark(tmp_path / "bench") == b
    first = (tmp_path / "bench" / "retain.jsonl").read_bytes()
    write_benchmark(generate_benchmark("micro", seed=2), tmp_path / "bench")
    assert (tmp_path / "bench" / "retain.jsonl").read_bytes() == first


def test_read_missing_or_corrupt_benchmark(tmp_path):
    with pytest.raises(UnlearnError, match="holds no benchmark"):
        read_benchmark(tmp_path / "nowhere")
    (tmp_path / "retain.jsonl").write_text('{"index": 0}\n{broken\n')
    with pytest.raises(UnlearnError, match="line 2 is not valid JSON"):
        read_benchmark(tmp_path)
