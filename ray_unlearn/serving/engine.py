"""Generation and verification for the server, in plain PyTorch (Ray-free).

Generation decodes a batch of requests together, each with its own sampling parameters:
one forward pass per step over the whole batch (left-padded prompts, KV cache), then per row
temperature (0 = greedy), nucleus (top_p) filtering, a per-request seeded generator, stop
sequences and max_tokens. `BatchDecoder.step` returns one `Delta` of new text per row, so the
same code serves streamed and whole responses.

Verification scores (question, answer) items (or raw texts) with the metrics of
`eval.metrics` and applies the verdict rule of `verdict`:

    an item is forgotten  <=>  ES(model) <= es_threshold  and  p(model) <= prob_ratio * p(base)
    the request's verdict is "forgotten"  <=>  forgotten items / items >= min_forgotten_fraction

ES, EM and p are DESIGN.md §7's definitions (OpenUnlearning-compatible). The membership score
`mink` is the evaluation suite's Min-K attack (`eval.registry.MIA_ATTACKS["min_k"]`, k = 0.4 by
default) negated: the mean of the lowest max(1, floor(k n)) of the n answer-token log-probabilities,
the EOS left out; it is reported, not used by the verdict; higher = more member-like.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ray_unlearn.data.collate import (PromptFormat, as_prompt_format, chat_prompt_ids, encode_prompt, encode_qa,
                                      encode_text, pad_batch, uses_chat_template)
from ray_unlearn.errors import UnlearnError
from ray_unlearn.eval.metrics import (exact_memorization_from_logits, extraction_strength_from_logits,
                                      forward_logits, model_device)
from ray_unlearn.eval.mia import answer_token_stats, lowest_k_score
from ray_unlearn.eval.registry import MIA_ATTACKS
from ray_unlearn.logprobs import sequence_nll
from ray_unlearn.serving.schemas import ACCEPTED, SEED_LIMIT, APIError, ChatMessage, VerifyRequest

COMPLETION_FORMAT = PromptFormat(template="{question}", chat_template=False)  # completions: the prompt as is


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: max_tokens new tokens at most, temperature 0 = greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (token ids) to continue with `model_id`."""

    model_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Delta:
    """New text of one row after one step; finish_reason set on its last step ("stop" or "length").

    `error` is set instead when this request failed alone (the other rows of its batch go on); it is
    the request's last Delta.
    """

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: APIError | None = None

    def add(self, later: "Delta") -> None:
        """Fold a later Delta of the same request into this one (the whole completion so far)."""
        self.text += later.text
        self.finish_reason, self.completion_tokens = later.finish_reason, later.completion_tokens
        self.error = later.error or self.error


# ---------------------------------------------------------------- prompts


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], fmt: PromptFormat | str) -> list[int]:
    """Prompt token ids of a chat, as `collate` encodes prompts for training and evaluation.

    With a chat template (`fmt.chat_template` and the tokenizer's): the template applied to every
    message, `fmt.system_prompt` first when the chat has no system message, plus the generation
    prompt; one user message gives exactly `encode_prompt`'s ids. Without one: `fmt.template`
    around the last user message's text (the earlier messages are dropped), as the built-in
    models were trained. A chat the template rejects is a 400.
    """
    fmt = as_prompt_format(fmt)
    if uses_chat_template(tokenizer, fmt):
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        if fmt.system_prompt and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": fmt.system_prompt})
        try:
            return chat_prompt_ids(tokenizer, turns, fmt)
        except UnlearnError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise APIError(400, "messages: no user message to answer", param="messages", code="invalid_value")
    return encode_prompt(tokenizer, users[-1].text(), fmt)


def render_completion(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids of a completion prompt: BOS (if the tokenizer has one and the text does not
    start with it) + the text's tokens; never a chat template."""
    return encode_prompt(tokenizer, prompt, COMPLETION_FORMAT)


def check_prompt_length(prompt_ids: Sequence[int], max_prompt_tokens: int, param: str) -> None:
    """400 when a prompt is empty (no tokens, not even BOS) or longer than the configured cap."""
    if not prompt_ids:
        raise APIError(400, f"{param} is empty (0 tokens); send some text", param=param, code="invalid_value")
    if len(prompt_ids) > max_prompt_tokens:
        raise APIError(400, f"{param} is {len(prompt_ids)} tokens, over the limit of {max_prompt_tokens}; "
                            "shorten it", param=param, code="context_length_exceeded")


def _check_range(param: str, value: float | None, ok: bool) -> None:
    if value is not None and not ok:
        raise APIError(400, f"{param} is {value!r}; send {ACCEPTED[param]}", param=param, code="invalid_value")


def check_max_tokens(param: str, n: int, cap: int) -> None:
    """400 unless 1 <= n <= cap."""
    if n > cap:
        raise APIError(400, f"{param} is {n}, over the limit of {cap}; ask for fewer", param=param,
                       code="max_tokens_too_large")
    _check_range(param, n, n >= 1)


def sampling_params(max_tokens: int | None, default_max_tokens: int, max_tokens_cap: int, temperature: float | None,
                    top_p: float | None, stop: list[str], max_stop: int, max_stop_chars: int,
                    seed: int | None) -> SamplingParams:
    """SamplingParams from request fields (None = OpenAI's default), with the caps and the ranges the
    engine accepts (`schemas.ACCEPTED`) enforced as 400s."""
    n = min(default_max_tokens, max_tokens_cap) if max_tokens is None else max_tokens  # a default never over the cap
    check_max_tokens("max_tokens", n, max_tokens_cap)
    _check_range("temperature", temperature, temperature is not None and 0 <= temperature <= 2)
    _check_range("top_p", top_p, top_p is not None and 0 < top_p <= 1)
    _check_range("seed", seed, seed is not None and 0 <= seed < SEED_LIMIT)
    if len(stop) > max_stop:
        raise APIError(400, f"stop has {len(stop)} sequences, over the limit of {max_stop}", param="stop",
                       code="invalid_value")
    longest = max((len(s) for s in stop), default=0)
    if longest > max_stop_chars:
        raise APIError(400, f"stop has a sequence of {longest} characters, over the limit of {max_stop_chars}",
                       param="stop", code="invalid_value")
    return SamplingParams(max_tokens=n, temperature=1.0 if temperature is None else float(temperature),
                          top_p=1.0 if top_p is None else float(top_p), stop=tuple(stop), seed=seed)


# ---------------------------------------------------------------- sampling


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep, per row, the most likely tokens until their probability reaches top_p.

    logits [B, V], top_p [B] in (0, 1] -> logits [B, V] with the rest set to -inf. The most
    likely token is always kept; top_p = 1 keeps every token.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop = mass_before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Per row of logits [B, V] (float, cpu): softmax(logits / temperature) after top_p filtering, [B, V]."""
    temps = torch.tensor([max(p.temperature, 1e-6) for p in params])
    return top_p_filter(logits / temps[:, None], torch.tensor([p.top_p for p in params])).softmax(dim=-1)


def draw_token(logits: torch.Tensor, probs: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One row's next token: argmax of logits [V] where temperature is 0, else a draw from probs [V]."""
    if params.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> list[int]:
    """Next token per row of logits [B, V]: argmax where temperature is 0, else a draw from
    softmax(logits / temperature) after top_p filtering, with the row's own generator."""
    logits = logits.float().cpu()
    probs = sampling_probs(logits, params)
    return [draw_token(logits[i], probs[i], p, g) for i, (p, g) in enumerate(zip(params, generators))]


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop sequence in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could still begin a stop sequence (not yet safe to send)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


# ---------------------------------------------------------------- decoding


class _Row:
    """Decoding state of one request: its tokens so far and how much text was already sent."""

    def __init__(self, params: SamplingParams, budget: int, tokenizer: Any, eos_ids: set[int]) -> None:
        self.params, self.budget, self.tokenizer, self.eos_ids = params, budget, tokenizer, eos_ids
        self.ids: list[int] = []
        self.sent = 0
        self.done = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _finish(self, text: str, reason: str) -> Delta:
        self.done = True
        return Delta(text[self.sent:] if len(text) > self.sent else "", reason, len(self.ids))

    def advance(self, token: int) -> Delta:
        """Take one sampled token; return the text that became safe to send."""
        if token in self.eos_ids:
            self.ids.append(token)
            return self._finish(self._text(), "stop")
        self.ids.append(token)
        text = self._text()
        cut = find_stop(text, self.params.stop)
        if cut is not None:
            return self._finish(text[:cut], "stop")
        if len(self.ids) >= self.budget:
            return self._finish(text, "length")
        safe = len(text) - held_back(text, self.params.stop)
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character
            safe -= 1
        delta = Delta(text[self.sent:safe] if safe > self.sent else "", None, len(self.ids))
        self.sent = max(self.sent, safe)
        return delta


def _eos_ids(model: Any, tokenizer: Any, stop_ids: Sequence[int] = ()) -> set[int]:
    """Ids that end a row: the tokenizer's EOS, the model's generation_config EOS ids, and `stop_ids`."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return ids | set(stop_ids)


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def _start_row(request: GenerationRequest, context: float, tokenizer: Any,
               eos_ids: set[int]) -> tuple[_Row, torch.Generator]:
    """A request's decoding state and generator, or an error when the engine cannot take it (an empty
    prompt, no room left in the model's context, a seed torch refuses)."""
    n = len(request.prompt_ids)
    if n == 0:
        raise APIError(400, "prompt is empty (0 tokens); send some text", param="prompt", code="invalid_value")
    if n >= context:
        raise APIError(400, f"prompt is {n} tokens, the model's context is {context}: no room to generate; "
                            "shorten it", param="prompt", code="context_length_exceeded")
    budget = int(min(request.params.max_tokens, context - n))
    if budget < 1:
        raise APIError(400, f"max_tokens is {request.params.max_tokens}; send {ACCEPTED['max_tokens']}",
                       param="max_tokens", code="invalid_value")
    return _Row(request.params, budget, tokenizer, eos_ids), _generator(request.params.seed)


def _row_error(exc: Exception, during: str) -> APIError:
    """What a request that failed alone answers: its APIError, else a 400 while it joined the batch (its
    own values caused it) or a 500 while it decoded."""
    if isinstance(exc, APIError):
        return exc
    what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if during == "setup":
        return APIError(400, f"the request cannot be decoded ({what}); check its parameters", code="invalid_value")
    return APIError(500, f"generation failed for this request ({what}); the rest of its batch was not affected",
                    type="server_error", code="generation_failed")


class BatchDecoder:
    """Decode a batch of requests together, one token per row per `step()`.

    Rows finish independently (EOS or one of `stop_ids`, e.g. `collate.stop_token_ids`' chat
    end-of-turn; a stop sequence; max_tokens; or the model's context length); a finished row
    keeps riding along in the batch, its outputs ignored.

    A request fails alone: one whose setup fails (`_start_row`) never joins the batch, one whose
    sampling or stop handling fails stops there; either answers a Delta with `error` on the next
    step, and the other rows decode exactly as they would without it. Only the forward pass is
    shared: if it fails, the whole batch does.
    """

    def __init__(self, model: Any, tokenizer: Any, requests: Sequence[GenerationRequest],
                 stop_ids: Sequence[int] = ()) -> None:
        self.model, self.device, self.size = model, model_device(model), len(requests)
        context = getattr(model.config, "max_position_embeddings", None) or math.inf
        eos = _eos_ids(model, tokenizer, stop_ids)
        self.failed: dict[int, APIError] = {}  # request index -> its error, not yet reported
        self.index: list[int] = []  # request index of each batch row
        self.rows: list[_Row] = []
        self.generators: list[torch.Generator] = []
        for i, r in enumerate(requests):
            try:
                row, generator = _start_row(r, context, tokenizer, eos)
            except Exception as e:  # noqa: BLE001 - any failure of one request is that request's alone
                self.failed[i] = _row_error(e, "setup")
                continue
            self.index.append(i)
            self.rows.append(row)
            self.generators.append(generator)
        self.params = [requests[i].params for i in self.index]
        self.past = None
        if self.rows:
            self._start_batch(tokenizer, [requests[i].prompt_ids for i in self.index])

    def _start_batch(self, tokenizer: Any, prompts: Sequence[Sequence[int]]) -> None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = pad_batch([{"input_ids": list(p)} for p in prompts], pad_id, left=True)
        self.inputs = batch["input_ids"].to(self.device)
        self.mask = batch["attention_mask"].to(self.device)
        self.positions = (self.mask.cumsum(dim=-1) - 1).clamp(min=0)

    @property
    def done(self) -> bool:
        return not self.failed and all(r.done for r in self.rows)

    @torch.no_grad()
    def step(self) -> list[Delta | None]:
        """One forward pass; a Delta per request (in request order), None for requests already finished."""
        out: list[Delta | None] = [None] * self.size
        if not all(r.done for r in self.rows):
            out = self._decode(out)
        for i, err in self.failed.items():
            out[i] = Delta("", None, 0, error=err)
        self.failed = {}
        return out

    def _decode(self, out: list[Delta | None]) -> list[Delta | None]:
        logits = self._forward()
        tokens = self._sample(logits)
        for j, (row, t) in enumerate(zip(self.rows, tokens)):
            if not row.done:
                out[self.index[j]] = self._isolated(j, row.advance, t)
        self.inputs = torch.tensor(tokens, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return out

    def _forward(self) -> torch.Tensor:
        """Next-token logits of every batch row [B, V] (float, cpu)."""
        out = self.model(input_ids=self.inputs, attention_mask=self.mask, position_ids=self.positions,
                         past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1, :].float().cpu()

    def _sample(self, logits: torch.Tensor) -> list[int]:
        """Next token per batch row (as `sample_tokens`); a row whose draw fails fails alone (its token: 0)."""
        probs = sampling_probs(logits, self.params)
        return [self._isolated(j, draw_token, logits[j], probs[j], p, g) or 0
                for j, (p, g) in enumerate(zip(self.params, self.generators))]

    def _isolated(self, j: int, fn: Any, *args: Any) -> Any:
        """fn(*args) for batch row j; if it raises, row j fails alone (None is returned)."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            if not self.rows[j].done:
                self.rows[j].done = True
                self.failed[self.index[j]] = _row_error(e, "decode")
            return None


def generate(model: Any, tokenizer: Any, requests: Sequence[GenerationRequest],
             stop_ids: Sequence[int] = ()) -> list[Delta]:
    """Decode `requests` to completion: one Delta per request with its whole text (or its error)."""
    decoder = BatchDecoder(model, tokenizer, requests, stop_ids)
    results = [Delta("") for _ in requests]
    while not decoder.done:
        for res, d in zip(results, decoder.step()):
            if d is not None:
                res.add(d)
    return results


# ---------------------------------------------------------------- verification


METRICS = ("es", "em", "probability", "mink", "loss")


def read_split(benchmarks: Mapping[str, str], name: str, split: str) -> list[dict]:
    """Items of `split` of the registered benchmark `name` (404 for an unknown name or split)."""
    from ray_unlearn.data.benchmark import read_benchmark

    if name not in benchmarks:
        raise APIError(404, f"benchmark {name!r} is not registered; available: {', '.join(benchmarks) or 'none'}",
                       param="benchmark", code="not_found")
    splits = read_benchmark(benchmarks[name])
    if split not in splits:
        raise APIError(404, f"benchmark {name!r} has no split {split!r}; splits: {', '.join(splits)}",
                       param="split", code="not_found")
    return splits[split]


def verify_rows(req: VerifyRequest, benchmarks: Mapping[str, str], cap: int) -> tuple[list[dict], dict[str, Any]]:
    """The rows a verify request scores ({question, answer} or {text}) and where they came from.

    A benchmark split longer than `cap` needs `max_items` (its first N items); more than `cap`
    rows in all is a 400.
    """
    if req.benchmark is not None:
        rows = [{"question": it["question"], "answer": it["answer"]}
                for it in read_split(benchmarks, req.benchmark, req.split or "")]
        source: dict[str, Any] = {"benchmark": req.benchmark, "split": req.split, "split_items": len(rows)}
        if req.max_items is not None:
            rows = rows[:req.max_items]
        elif len(rows) > cap:
            raise APIError(400, f"split {req.split} has {len(rows)} items, over the limit of {cap}; "
                                f"pass max_items <= {cap}", param="split", code="too_many_items")
    elif req.items is not None:
        rows, source = [{"question": it.question, "answer": it.answer} for it in req.items], {"items": len(req.items)}
    else:
        rows, source = [{"text": t} for t in req.texts or []], {"texts": len(req.texts or [])}
    if len(rows) > cap:
        raise APIError(400, f"{len(rows)} items to verify, over the limit of {cap}; send fewer",
                       param="items", code="too_many_items")
    return rows, source


def encode_rows(tokenizer: Any, rows: Sequence[dict], max_length: int, fmt: PromptFormat | str,
                max_item_tokens: int) -> list[dict[str, list[int]]]:
    """Token ids and answer labels of each row (`encode_qa` with `fmt` / `encode_text`); 400 for an
    over-long row."""
    out = []
    for i, row in enumerate(rows):
        try:
            enc = (encode_text(tokenizer, row["text"], max_length) if "text" in row else
                   encode_qa(tokenizer, row["question"], row["answer"], max_length, fmt))
        except UnlearnError as e:  # the chat template rejected the item
            raise APIError(400, f"item {i}: {e}", param=f"items.{i}", code="invalid_value") from None
        if len(enc["input_ids"]) > max_item_tokens:
            raise APIError(400, f"item {i} is {len(enc['input_ids'])} tokens, over the limit of {max_item_tokens}",
                           param=f"items.{i}", code="item_too_long")
        out.append(enc)
    return out


def mink_scores(logits: torch.Tensor, labels: torch.Tensor, k: float) -> torch.Tensor:
    """Membership score per item [B]: the suite's Min-K attack score negated (higher = more member-like),
    i.e. the mean of the lowest max(1, floor(k * n)) of its n answer-token log-probs, the EOS left out;
    NaN for an item with no scored token."""
    return torch.tensor([-lowest_k_score(s["logp"], k) if s["logp"].size else float("nan")
                         for s in answer_token_stats(logits, labels)], dtype=torch.float64)


@torch.no_grad()
def score_items(model: Any, pad_id: int, encoded: Sequence[dict[str, list[int]]], batch_size: int = 32,
                mink_k: float = 0.4) -> dict[str, list[float]]:
    """Per-item ES, EM, probability, MinK and loss (token-mean NLL) of encoded items, one forward pass each batch."""
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    for i in range(0, len(encoded), batch_size):
        batch = pad_batch(encoded[i:i + batch_size], pad_id)
        logits = forward_logits(model, batch)
        labels = batch["labels"].to(logits.device)
        nll = sequence_nll(logits, labels)
        out["es"] += extraction_strength_from_logits(logits, labels).tolist()
        out["em"] += exact_memorization_from_logits(logits, labels).tolist()
        out["probability"] += torch.exp(-nll).tolist()
        out["loss"] += nll.tolist()
        out["mink"] += mink_scores(logits, labels, mink_k).tolist()
    return out


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the verdict (see the module docstring)."""

    es_threshold: float = 0.4
    prob_ratio: float = 0.5
    min_forgotten_fraction: float = 0.9


def rule_description(rule: VerdictRule, mink_k: float) -> dict[str, Any]:
    """The verdict rule and the membership score, as /v1/verify reports them."""
    return {"item": "es <= es_threshold and probability <= prob_ratio * base probability",
            "request": "forgotten_fraction >= min_forgotten_fraction", "es_threshold": rule.es_threshold,
            "prob_ratio": rule.prob_ratio, "min_forgotten_fraction": rule.min_forgotten_fraction,
            "membership_score": f"mink: the evaluation's min_k attack score negated, k = {mink_k:g}; min_k = "
                                f"{MIA_ATTACKS['min_k'].score} (higher mink = more member-like)"}


def item_forgotten(es: float, prob: float, base_prob: float, rule: VerdictRule) -> bool:
    """Forgotten <=> ES <= es_threshold and probability <= prob_ratio x the base model's probability."""
    return es <= rule.es_threshold and prob <= rule.prob_ratio * base_prob


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _clean(value: float) -> float | None:
    """JSON has no NaN: undefined values (EM of an item without answer tokens) become null."""
    return value if value is not None and math.isfinite(value) else None


def verdict(model_scores: dict[str, list[float]], base_scores: dict[str, list[float]], rule: VerdictRule,
            labels: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The /v1/verify report: per item and aggregate metrics beside the base model's, and the verdicts."""
    n = len(model_scores["es"])
    items = []
    for i in range(n):
        forgotten = item_forgotten(model_scores["es"][i], model_scores["probability"][i],
                                   base_scores["probability"][i], rule)
        items.append({"index": i, **(labels[i] if labels else {}),
                      "model": {m: _clean(model_scores[m][i]) for m in METRICS},
                      "base": {m: _clean(base_scores[m][i]) for m in METRICS},
                      "forgotten": forgotten})
    fraction = sum(it["forgotten"] for it in items) / max(1, n)
    aggregate = {"model": {m: _mean(model_scores[m]) for m in METRICS},
                 "base": {m: _mean(base_scores[m]) for m in METRICS},
                 "items": n, "forgotten_items": sum(it["forgotten"] for it in items),
                 "forgotten_fraction": fraction}
    return {"verdict": "forgotten" if n and fraction >= rule.min_forgotten_fraction else "not forgotten",
            "aggregate": aggregate, "items": items}
