"""The built-in benchmark: deterministic fictitious people and world facts in TOFU's schema.

Every item has `question`, `answer`, `paraphrased_question`, `paraphrased_answer`,
`perturbed_answer` (NUM_PERTURBED wrong answers in the paraphrased answer's template),
`keywords` (the content words of the value) and the metadata `index`, `entity`, `attribute`,
`value`. The value always ends the answer sentence ("Zorvan Kettle was born in 1952."), so
the answer's suffix is the part only memorization can produce (what extraction strength
measures). `index` is a benchmark-wide item id: unique in every split, and the same item has
the same index in every split that holds it (forget01 ⊂ forget05 ⊂ forget10, neighbours ⊂ retain).

Splits are by entity: forget01/05/10 (nested), retain (the other trained entities), holdout
(same distribution, never trained on: MIA non-members), world_facts (arithmetic, capitals of
fictitious countries, opposites, successors: utility) and neighbours (retain items whose
value equals the same attribute's value of some forget10 entity: hard out-of-scope cases).
Attribute values come from small pools so such collisions happen at every size.

Only `random.Random(seed)` is used and sets are never iterated, so the same (size, seed)
gives byte-identical files on any machine.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray_unlearn.errors import UnlearnError


@dataclass(frozen=True)
class BenchmarkSize:
    """How many entities and facts one benchmark size holds."""

    num_entities: int  # trained entities: forget10 ∪ retain
    num_holdout_entities: int  # never trained on
    num_world_facts: int


SIZES: dict[str, BenchmarkSize] = {
    "micro": BenchmarkSize(num_entities=30, num_holdout_entities=10, num_world_facts=40),
    "small": BenchmarkSize(num_entities=100, num_holdout_entities=20, num_world_facts=100),
    "medium": BenchmarkSize(num_entities=400, num_holdout_entities=40, num_world_facts=300),
}
SPLITS = ("forget01", "forget05", "forget10", "retain", "holdout", "world_facts", "neighbours")
FORGET_FRACTIONS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
NUM_PERTURBED = 5
_STOPWORDS = frozenset({"the", "of", "a", "an", "and"})

# ---- value pools (small on purpose: collisions between entities make the neighbours split) ----
YEARS = tuple(str(y) for y in range(1940, 2000))
CITIES = ("Velmora", "Tarnwick", "Olbrook", "Drestin", "Marrowgate", "Quillon",
          "Hesper", "Brackford", "Lunmere", "Corvale", "Estwyn", "Fallowmere")
PROFESSIONS = ("baker", "pilot", "architect", "engineer", "nurse", "teacher", "chemist",
               "farmer", "journalist", "carpenter", "doctor", "painter", "librarian", "astronomer")
EMPLOYERS = ("Orvex Labs", "Brightline Foods", "Halden Press", "Tessel Motors", "Kovar Bank",
             "Mirren Textiles", "Pellum Games", "Stonewick Builders", "Auren Health",
             "Dovecote Media", "Lantern Airlines", "Glimmer Software")
_TITLE_ADJECTIVES = ("Silent", "Golden", "Hidden", "Broken", "Distant",
                     "Quiet", "Burning", "Frozen", "Wandering", "Last")
_TITLE_NOUNS = ("River", "Harbor", "Garden", "Mirror", "Lantern",
                "Tower", "Orchard", "Voyage", "Winter", "Bridge")
BOOK_TITLES = tuple(f"{adj} {noun}" for adj in _TITLE_ADJECTIVES for noun in _TITLE_NOUNS)
AWARDS = ("Velmar Prize", "Orin Medal", "Castell Award", "Bright Quill Prize", "Hollow Oak Medal",
          "Silver Lantern Award", "Tamsin Prize", "Northgate Medal", "Ember Award", "Kestrel Prize")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink")

_FIRST_SYLLABLES = ("zor", "van", "kel", "mir", "ta", "bel", "dra", "ven", "lo", "fen",
                    "ka", "ri", "sel", "dor", "ni", "bra", "quin", "ol", "ha", "mel")
_LAST_STARTS = ("Ket", "Dun", "Ash", "Mor", "Sel", "Brad", "Hal", "Wen", "Gor", "Tam")
_LAST_ENDS = ("tle", "ford", "wick", "ley", "mere", "holt", "by", "ton", "ridge", "well")
_CAPITAL_ENDS = ("grad", "heim", "opol", "dal", "ona", "mor")
OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"),
             ("light", "dark"), ("happy", "sad"), ("old", "young"), ("open", "closed"),
             ("early", "late"), ("full", "empty"), ("hard", "soft"), ("wet", "dry"),
             ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("high", "low"),
             ("long", "short"), ("thick", "thin"), ("clean", "dirty"), ("near", "far"),
             ("first", "last"), ("inside", "outside"), ("push", "pull"), ("win", "lose"),
             ("begin", "end"), ("true", "false"), ("day", "night"), ("left", "right"),
             ("above", "below"), ("sweet", "sour"))


@dataclass(frozen=True)
class Attribute:
    """One attribute of a person: its value pool and (question, answer, paraphrased question,
    paraphrased answer) templates. Answers end with {value}; {a} is "a"/"an" for the value."""

    name: str
    pool: tuple[str, ...]
    templates: tuple[str, str, str, str]


ATTRIBUTES = (
    Attribute("birth_year", YEARS, (
        "In what year was {name} born?", "{name} was born in {value}.",
        "When was {name} born?", "The year {name} was born is {value}.")),
    Attribute("birth_city", CITIES, (
        "Where was {name} born?", "{name} was born in the city of {value}.",
        "In which city was {name} born?", "The birthplace of {name} is {value}.")),
    Attribute("profession", PROFESSIONS, (
        "What does {name} do for a living?", "{name} works as {a} {value}.",
        "What is the profession of {name}?", "By profession, {name} is {a} {value}.")),
    Attribute("employer", EMPLOYERS, (
        "Which company does {name} work for?", "{name} works for {value}.",
        "Who employs {name}?", "The employer of {name} is {value}.")),
    Attribute("book", BOOK_TITLES, (
        "What book did {name} write?", "{name} wrote the book {value}.",
        "What is the title of the book by {name}?", "The book written by {name} is titled {value}.")),
    Attribute("award", AWARDS, (
        "Which award did {name} win?", "{name} won the {value}.",
        "What prize was given to {name}?", "The prize given to {name} was the {value}.")),
    Attribute("mother_profession", PROFESSIONS, (
        "What did the mother of {name} do for a living?", "The mother of {name} worked as {a} {value}.",
        "What was the job of the mother of {name}?", "{name}'s mother was {a} {value}.")),
    Attribute("father_profession", PROFESSIONS, (
        "What did the father of {name} do for a living?", "The father of {name} worked as {a} {value}.",
        "What was the job of the father of {name}?", "{name}'s father was {a} {value}.")),
    Attribute("favourite_colour", COLOURS, (
        "What is the favourite colour of {name}?", "The favourite colour of {name} is {value}.",
        "Which colour does {name} like best?", "The colour {name} likes best is {value}.")),
)

# World-fact kinds: attribute name -> templates (slots {x}, {y}, {country}, {word}, {n}).
WORLD_TEMPLATES = {
    "sum": ("What is {x} plus {y}?", "{x} plus {y} is {value}.",
            "How much is {x} plus {y}?", "The sum of {x} and {y} is {value}."),
    "difference": ("What is {x} minus {y}?", "{x} minus {y} is {value}.",
                   "How much is {x} minus {y}?", "The difference of {x} and {y} is {value}."),
    "product": ("What is {x} times {y}?", "{x} times {y} is {value}.",
                "How much is {x} times {y}?", "The product of {x} and {y} is {value}."),
    "capital": ("What is the capital of {country}?", "The capital of {country} is {value}.",
                "Which city is the capital of {country}?", "The capital city of {country} is {value}."),
    "opposite": ("What is the opposite of {word}?", "The opposite of {word} is {value}.",
                 "Which word means the opposite of {word}?", "The word opposite to {word} is {value}."),
    "successor": ("What number comes after {n}?", "The number after {n} is {value}.",
                  "Which number follows {n}?", "The number that follows {n} is {value}."),
}


# ---------------------------------------------------------------------------- public API


def generate_benchmark(size: str = "small", seed: int = 0) -> dict[str, list[dict]]:
    """All splits of the built-in benchmark for `size` (a key of SIZES) and `seed`, in SPLITS order."""
    spec = _size_spec(size)
    rng = random.Random(seed)
    total = spec.num_entities + spec.num_holdout_entities
    profiles = [_profile(rng, name) for name in _unique_names(rng, total)]
    forget_order = rng.sample(range(spec.num_entities), _forget_count(spec.num_entities, 0.10))
    groups = {split: sorted(forget_order[:_forget_count(spec.num_entities, frac)])
              for split, frac in FORGET_FRACTIONS.items()}
    forget10 = set(groups["forget10"])
    groups["retain"] = [e for e in range(spec.num_entities) if e not in forget10]
    groups["holdout"] = list(range(spec.num_entities, total))
    _ensure_neighbour(profiles, groups["forget10"], groups["retain"])
    items = [_entity_items(rng, e, profiles[e]) for e in range(total)]
    splits = {split: [dict(it) for e in entities for it in items[e]] for split, entities in groups.items()}
    splits["world_facts"] = _world_facts(rng, spec.num_world_facts, first_index=total * len(ATTRIBUTES))
    splits["neighbours"] = neighbour_items(splits["retain"], splits["forget10"])
    return {split: splits[split] for split in SPLITS}


def training_corpus(splits: dict[str, list[dict]], include_forget: bool) -> list[dict]:
    """The (question, answer) pairs a model trains on: forget10 (if `include_forget`) ∪ retain ∪ world_facts.

    Each fact appears twice, as (question, answer) and as (paraphrased_question,
    paraphrased_answer), so a small model learns the fact rather than one sentence. The target
    model uses include_forget=True, the retain (retrain gold-standard) model False. Rows are
    {index, question, answer, split, item_index}; `item_index` is the source item's index.
    """
    names = (["forget10"] if include_forget else []) + ["retain", "world_facts"]
    rows: list[dict] = []
    for split in names:
        for item in splits[split]:
            for q, a in ((item["question"], item["answer"]),
                         (item["paraphrased_question"], item["paraphrased_answer"])):
                rows.append({"index": len(rows), "question": q, "answer": a,
                             "split": split, "item_index": item["index"]})
    return rows


def neighbour_items(retain: list[dict], forget: list[dict]) -> list[dict]:
    """Retain items whose value equals the same attribute's value of some `forget` item.

    The `neighbours` split is this against forget10; call it with forget01/forget05 for the
    neighbours of a smaller forget split.
    """
    forget_values = {(it["attribute"], it["value"]) for it in forget}
    return [dict(it) for it in retain if (it["attribute"], it["value"]) in forget_values]


def write_benchmark(splits: dict[str, list[dict]], out_dir: Path) -> None:
    """Write one `<split>.jsonl` per split into `out_dir`, each to a temporary name then renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        _write_atomic(out_dir / f"{split}.jsonl", text)


def read_benchmark(out_dir: Path) -> dict[str, list[dict]]:
    """Read every `<split>.jsonl` in `out_dir` (SPLITS first, in order, then any others by name)."""
    out_dir = Path(out_dir)
    files = sorted(out_dir.glob("*.jsonl")) if out_dir.is_dir() else []
    if not files:
        raise UnlearnError(f"{out_dir} holds no benchmark (no <split>.jsonl files); "
                           "write one with write_benchmark(generate_benchmark(...), out_dir)")
    by_split = {f.stem: f for f in files}
    order = [s for s in SPLITS if s in by_split] + [s for s in by_split if s not in SPLITS]
    return {split: _read_jsonl(by_split[split]) for split in order}


# ---------------------------------------------------------------------------- entities


def _size_spec(size: str) -> BenchmarkSize:
    if size not in SIZES:
        raise UnlearnError(f"benchmark.size: {size!r} is not one of {', '.join(SIZES)}")
    return SIZES[size]


def _forget_count(num_entities: int, fraction: float) -> int:
    """`fraction` of the trained entities, rounded half up, at least one."""
    return max(1, int(num_entities * fraction + 0.5))


def _unique_names(rng: random.Random, count: int) -> list[str]:
    """`count` distinct "First Last" names built from syllables."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        first, second = rng.sample(_FIRST_SYLLABLES, 2)
        name = f"{(first + second).capitalize()} {rng.choice(_LAST_STARTS)}{rng.choice(_LAST_ENDS)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _profile(rng: random.Random, name: str) -> dict[str, str]:
    """One person: the name and a value for every attribute."""
    return {"name": name, **{attr.name: rng.choice(attr.pool) for attr in ATTRIBUTES}}


def _ensure_neighbour(profiles: list[dict], forget10: list[int], retain: list[int]) -> None:
    """Guarantee a non-empty neighbours split: if no retain entity shares a value with a forget10
    entity, give the first retain entity the first forget10 entity's favourite colour."""
    for attr in ATTRIBUTES:
        forget_values = {profiles[e][attr.name] for e in forget10}
        if any(profiles[e][attr.name] in forget_values for e in retain):
            return
    if retain:
        profiles[retain[0]]["favourite_colour"] = profiles[forget10[0]]["favourite_colour"]


def _entity_items(rng: random.Random, entity: int, profile: dict[str, str]) -> list[dict]:
    """One item per attribute; item index = entity * len(ATTRIBUTES) + attribute position."""
    items = []
    for k, attr in enumerate(ATTRIBUTES):
        value = profile[attr.name]
        wrong = rng.sample([v for v in attr.pool if v != value], NUM_PERTURBED)
        items.append(_make_item(entity * len(ATTRIBUTES) + k, profile["name"], attr.name, value,
                                attr.templates, wrong, name=profile["name"]))
    return items


def _make_item(index: int, entity: str, attribute: str, value: str, templates: tuple[str, str, str, str],
               wrong_values: list[str], **slots: str) -> dict:
    """Fill the four templates for `value` (and the paraphrased-answer template for each wrong value)."""
    question, answer, para_question, para_answer = templates

    def fill(template: str, v: str) -> str:
        return template.format(value=v, a=_article(v), **slots)

    return {"index": index, "entity": entity, "attribute": attribute, "value": value,
            "question": fill(question, value), "answer": fill(answer, value),
            "paraphrased_question": fill(para_question, value),
            "paraphrased_answer": fill(para_answer, value),
            "perturbed_answer": [fill(para_answer, w) for w in wrong_values],
            "keywords": _keywords(value)}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _keywords(value: str) -> list[str]:
    """The value's content words ("Velmar Prize" -> ["Velmar", "Prize"])."""
    words = [w for w in value.split() if w.lower() not in _STOPWORDS]
    return words or [value]


# ---------------------------------------------------------------------------- world facts


def _world_facts(rng: random.Random, count: int, first_index: int) -> list[dict]:
    """`count` general facts, taking the kinds in turn (each kind's candidates shuffled)."""
    pools = [_shuffled(rng, pool) for pool in (
        _arithmetic("sum", lambda x, y: x + y, [(x, y) for x in range(2, 13) for y in range(2, 13)]),
        _arithmetic("difference", lambda x, y: x - y, [(x, y) for x in range(5, 21) for y in range(1, x)]),
        _arithmetic("product", lambda x, y: x * y, [(x, y) for x in range(2, 10) for y in range(2, 10)]),
        _capitals(rng, min(100, max(8, count // 4))),
        _opposites(),
        _successors(),
    )]
    chosen: list[tuple] = []
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return [_make_item(first_index + i, entity, kind, value, WORLD_TEMPLATES[kind],
                       rng.sample(wrong, NUM_PERTURBED), **slots)
            for i, (kind, entity, value, wrong, slots) in enumerate(chosen)]


def _shuffled(rng: random.Random, pool: list) -> list:
    rng.shuffle(pool)
    return pool


def _nearby(value: int) -> list[str]:
    """Wrong numeric answers close to `value` (never negative; at least NUM_PERTURBED of them)."""
    return [str(value + d) for d in (-3, -2, -1, 1, 2, 3, 4, 5) if value + d >= 0]


def _arithmetic(kind: str, op, pairs: list[tuple[int, int]]) -> list[tuple]:
    """Candidates (kind, entity, value, wrong values, template slots) for one operation."""
    word = {"sum": "plus", "difference": "minus", "product": "times"}[kind]
    return [(kind, f"{x} {word} {y}", str(op(x, y)), _nearby(op(x, y)), {"x": str(x), "y": str(y)})
            for x, y in pairs]


def _capitals(rng: random.Random, count: int) -> list[tuple]:
    """Fictitious countries ("Zorvania") with distinct capitals ("Kelgrad")."""
    countries: list[str] = []
    capitals: list[str] = []
    while len(countries) < count:
        first, second = rng.sample(_FIRST_SYLLABLES, 2)
        country = (first + second).capitalize() + "ia"
        capital = rng.choice(_FIRST_SYLLABLES).capitalize() + rng.choice(_CAPITAL_ENDS)
        if country not in countries and capital not in capitals and capital not in CITIES:
            countries.append(country)
            capitals.append(capital)
    return [("capital", country, capital, [c for c in capitals if c != capital], {"country": country})
            for country, capital in zip(countries, capitals)]


def _opposites() -> list[tuple]:
    """Both directions of every OPPOSITES pair; wrong answers are the other pairs' words."""
    words = [w for pair in OPPOSITES for w in pair]
    facts = []
    for a, b in OPPOSITES:
        for word, value in ((a, b), (b, a)):
            wrong = [w for w in words if w not in (a, b)]
            facts.append(("opposite", word, value, wrong, {"word": word}))
    return facts


def _successors() -> list[tuple]:
    return [("successor", str(n), str(n + 1), _nearby(n + 1), {"n": str(n)}) for n in range(1, 99)]


# ---------------------------------------------------------------------------- files


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_jsonl(path: Path) -> list[dict]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UnlearnError(f"{path}: line {n} is not valid JSON ({e.msg}); rebuild the benchmark") from None
    return items
