"""Generation and verification for the server, in plain PyTorch (Ray-free).

Generation decodes the running requests of a model together, each with its own sampling
parameters: one forward pass per step over every running row (a shared, left-padded KV cache),
then per row temperature (0 = greedy), nucleus (top_p) filtering, a per-request seeded generator,
stop sequences and max_tokens. Requests join and leave between steps (`DecodeBatch`: continuous
batching; `serving.scheduler` decides who joins when). Each step returns one `Delta` of new text per
row, so the same code serves streamed and whole responses.

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
from typing import Any, Hashable, Mapping, Sequence

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
    """One prompt (token ids) to continue with `model_id`; `adapter` (a LoRA adapter's model id, loaded on
    `model_id` as its shared base: `serving.adapters`) applies to this row alone, None = the model itself."""

    model_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None


@dataclass
class Delta:
    """New text of one row after one step; finish_reason set on its last step ("stop" or "length").

    `error` is set instead when this request failed (alone, or with its batch's forward pass); it is
    the request's last Delta.
    """

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: APIError | None = None
    token_ids: list[int] = field(default_factory=list)  # the tokens this step took (text may hold some back)

    def add(self, later: "Delta") -> None:
        """Fold a later Delta of the same request into this one (the whole completion so far)."""
        self.text += later.text
        self.finish_reason, self.completion_tokens = later.finish_reason, later.completion_tokens
        self.error = later.error or self.error
        self.token_ids = self.token_ids + later.token_ids


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
    """Per row of logits [B, V] (float, cpu): softmax(logits / temperature) after top_p filtering, [B, V].
    Rows with top_p = 1 skip the filter (it keeps every token); each row's result depends on that row alone."""
    temps = torch.tensor([max(p.temperature, 1e-6) for p in params])
    scaled = logits / temps[:, None]
    top_p = torch.tensor([p.top_p for p in params])
    nucleus = top_p < 1
    if nucleus.any():
        scaled[nucleus] = top_p_filter(scaled[nucleus], top_p[nucleus])
    return scaled.softmax(dim=-1)


def draw_token(logits: torch.Tensor, probs: torch.Tensor | None, params: SamplingParams,
               generator: torch.Generator) -> int:
    """One row's next token: argmax of logits [V] where temperature is 0 (probs unused: may be None), else a
    draw from probs [V]."""
    if params.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> list[int]:
    """Next token per row of logits [B, V]: argmax where temperature is 0, else a draw from
    softmax(logits / temperature) after top_p filtering, with the row's own generator. Only sampled rows
    pay for the softmax and the filter."""
    logits = logits.float().cpu()
    drawn = [i for i, p in enumerate(params) if p.temperature != 0]
    probs = dict(zip(drawn, sampling_probs(logits[drawn], [params[i] for i in drawn]))) if drawn else {}
    return [draw_token(logits[i], probs.get(i), p, g) for i, (p, g) in enumerate(zip(params, generators))]


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


def _start_row(request: GenerationRequest, context: float, tokenizer: Any, eos_ids: set[int],
               adapters: frozenset[str] = frozenset()) -> tuple[_Row, torch.Generator]:
    """A request's decoding state and generator, or an error when the engine cannot take it (an adapter the
    model has not loaded, an empty prompt, no room left in the model's context, a seed torch refuses)."""
    if request.adapter is not None and request.adapter not in adapters:
        raise APIError(404, f"adapter {request.adapter!r} is not loaded on model {request.model_id!r}",
                       param="model", code="model_not_found")
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


def _what(exc: Exception) -> str:
    """An exception's type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _row_error(exc: Exception, during: str) -> APIError:
    """What a request that failed alone answers: its APIError, else a 400 while it joined the batch (its
    own values caused it) or a 500 while it decoded."""
    if isinstance(exc, APIError):
        return exc
    what = _what(exc)
    if during == "setup":
        return APIError(400, f"the request cannot be decoded ({what}); check its parameters", code="invalid_value")
    return APIError(500, f"generation failed for this request ({what}); the rest of its batch was not affected",
                    type="server_error", code="generation_failed")


def batch_error(exc: Exception) -> APIError:
    """What every request of a forward pass that failed answers (the pass is shared, so all of them fail)."""
    return APIError(503, f"the model failed while decoding this request's batch ({_what(exc)}); retry",
                    type="server_error", code="model_unavailable")


@dataclass(eq=False)
class LoadedModel:
    """A model, its tokenizer and the token ids its generation stops on (besides EOS). Compared by identity: a
    model loaded again is another model."""

    model: Any
    tokenizer: Any
    stop_ids: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Slot:
    """One running request of a DecodeBatch: the caller's key, its decoding state and its generator."""

    key: Hashable
    row: _Row
    generator: torch.Generator
    params: SamplingParams
    prompt_ids: tuple[int, ...]
    adapter: str | None = None


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x with n zeros put before it along `dim`."""
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _joinable(cache: Any) -> bool:
    """Whether rows can be padded into this KV cache: every layer a plain DynamicLayer ([B, heads, T, head_dim]).
    Sliding-window and linear-attention layers are not (their rows then decode as a batch fixed at its start)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _adapter_kwargs(slots: Sequence[_Slot]) -> dict[str, Any]:
    """The forward pass's per-row adapters when any row has one ({} otherwise: a plain model never sees the
    argument, and a SharedBase runs rows without it on the base)."""
    return {"adapters": [s.adapter for s in slots]} if any(s.adapter is not None for s in slots) else {}


class DecodeBatch:
    """The running requests of one model, decoded together one token per row per `step()`. Requests join
    between steps (`join`: their prompts are prefilled in one forward pass, then they decode with the others)
    and leave as soon as they finish, fail, or are withdrawn (`leave`); their rows are freed at once.

    The rows share one KV cache, left-padded to the longest row ([rows, heads, T, head_dim] per layer), with
    a per-row attention mask over it and per-row position ids (0 at the row's first prompt token): padding
    is masked out, so a row's logits are those of decoding it alone, up to float rounding, and with its own
    generator it draws the same tokens. Joining pads the shorter side on the left; leaving drops the rows
    and the leading columns no remaining row uses.

    A request fails alone: one whose setup fails (`_start_row`) never joins, one whose sampling or stop
    handling fails leaves; each answers a Delta with `error`. Only a forward pass is shared: if a prefill
    fails, the requests joining in it fail; if a decode step fails, every running request does (503).

    Rows of a model that serves LoRA adapters (`serving.adapters.SharedBase`) may each use another adapter
    (the request's `adapter`): every forward pass gets the adapter of each row, in row order, and peft applies
    it to that row alone, so a row decodes as its adapter (or the base) would alone.

    Deltas are keyed by the caller's key of each request (`join`'s pairs). Not thread-safe: one caller.
    """

    def __init__(self, model: Any, tokenizer: Any, stop_ids: Sequence[int] = ()) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, model_device(model)
        self.context = getattr(model.config, "max_position_embeddings", None) or math.inf
        self.eos = _eos_ids(model, tokenizer, stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.joinable: bool | None = None  # known after the first prefill
        self.adapters: frozenset[str] = getattr(model, "adapter_ids", frozenset())
        self._reset()

    def _reset(self) -> None:
        self.slots: list[_Slot] = []
        self.cache: Any = None
        self.mask = self.positions = self.last = torch.empty(0, dtype=torch.long)  # [B, T], [B], [B]

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def keys(self) -> list[Hashable]:
        """The keys of the running requests, in row order."""
        return [s.key for s in self.slots]

    @property
    def accepts_joins(self) -> bool:
        """Whether requests can join now (always when empty; while running only into a joinable cache)."""
        return not self.slots or self.joinable is not False

    @torch.no_grad()
    def join(self, requests: Sequence[tuple[Hashable, GenerationRequest]]) -> dict[Hashable, Delta]:
        """Prefill `requests` (key, request) and draw their first tokens; those not finished by it join the
        running rows. Returns each request's first Delta (or its error)."""
        if not self.accepts_joins:
            raise ValueError("this model's KV cache cannot take rows while others decode; join when it is empty")
        out: dict[Hashable, Delta] = {}
        slots = []
        for key, request in requests:
            try:
                row, generator = _start_row(request, self.context, self.tokenizer, self.eos, self.adapters)
            except Exception as e:  # noqa: BLE001 - any failure of one request is that request's alone
                out[key] = Delta("", error=_row_error(e, "setup"))
                continue
            slots.append(_Slot(key, row, generator, request.params, request.prompt_ids, request.adapter))
        if not slots:
            return out
        try:
            logits, cache, mask, positions = self._prefill(slots)
        except Exception as e:  # noqa: BLE001 - the joining requests' pass: the running rows are untouched
            return {**out, **{s.key: Delta("", error=batch_error(e)) for s in slots}}
        deltas, tokens, keep = self._advance(slots, logits)
        if keep:
            idx = torch.tensor(keep, device=self.device)
            cache.reorder_cache(idx)
            self._add([slots[j] for j in keep], cache, mask[idx], positions[idx],
                      torch.tensor(tokens, device=self.device)[idx])
        return {**out, **deltas}

    @torch.no_grad()
    def step(self) -> dict[Hashable, Delta]:
        """One decode step of every running row: a Delta per request."""
        if not self.slots:
            return {}
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        try:
            out = self.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=self.positions[:, None],
                             past_key_values=self.cache, use_cache=True, **_adapter_kwargs(self.slots))
            logits = out.logits[:, -1, :].float().cpu()
        except Exception as e:  # noqa: BLE001 - a shared pass: every running request fails, the batch starts over
            failed = {s.key: Delta("", error=batch_error(e)) for s in self.slots}
            self._reset()
            return failed
        self.cache, self.mask, self.positions = out.past_key_values, mask, self.positions + 1
        deltas, tokens, keep = self._advance(self.slots, logits)
        self.last = torch.tensor(tokens, device=self.device)
        self._keep(keep)
        return deltas

    def leave(self, keys: Sequence[Hashable]) -> None:
        """Drop the requests with these keys (e.g. their clients went away): their rows are freed now."""
        gone = set(keys)
        self._keep([j for j, s in enumerate(self.slots) if s.key not in gone])

    def _prefill(self, slots: Sequence[_Slot]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """One forward pass over the slots' left-padded prompts: (next-token logits [B, V] float cpu, KV cache,
        mask [B, T], next position id [B])."""
        batch = pad_batch([{"input_ids": list(s.prompt_ids)} for s in slots], self.pad_id, left=True)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **_adapter_kwargs(slots))
        if self.joinable is None:
            self.joinable = _joinable(out.past_key_values)
        return out.logits[:, -1, :].float().cpu(), out.past_key_values, mask, positions[:, -1] + 1

    def _advance(self, slots: Sequence[_Slot], logits: torch.Tensor) -> tuple[dict, list[int], list[int]]:
        """Draw each row's token from logits [B, V] and take it: (Delta per key, tokens, indices of the rows
        still running). A row whose draw or stop handling raises fails alone."""
        drawn = [j for j, s in enumerate(slots) if s.params.temperature != 0]
        probs = dict(zip(drawn, sampling_probs(logits[drawn], [slots[j].params for j in drawn]))) if drawn else {}
        deltas, tokens = {}, []
        for j, s in enumerate(slots):
            token = 0
            try:
                token = draw_token(logits[j], probs.get(j), s.params, s.generator)
                deltas[s.key] = s.row.advance(token)
                deltas[s.key].token_ids = [token]
            except Exception as e:  # noqa: BLE001
                s.row.done = True
                deltas[s.key] = Delta("", error=_row_error(e, "decode"))
            tokens.append(token)
        return deltas, tokens, [j for j, s in enumerate(slots) if not s.row.done]

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices); drop the leading cache columns no kept row attends to."""
        if len(keep) == len(self.slots):
            return
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.device)
        self.slots = [self.slots[j] for j in keep]
        self.cache.reorder_cache(idx)
        self.mask, self.positions, self.last = self.mask[idx], self.positions[idx], self.last[idx]
        start = int(self.mask.any(dim=0).int().argmax())
        if start and self.joinable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def _add(self, slots: list[_Slot], cache: Any, mask: torch.Tensor, positions: torch.Tensor,
             last: torch.Tensor) -> None:
        """Append prefilled rows to the running ones, left-padding whichever cache is shorter."""
        if not self.slots:
            self.slots, self.cache, self.mask, self.positions, self.last = slots, cache, mask, positions, last
            return
        width = max(self.mask.shape[1], mask.shape[1])
        pad_mine, pad_theirs = width - self.mask.shape[1], width - mask.shape[1]
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, pad_mine, 2), _pad_left(theirs.keys, pad_theirs, 2)])
            mine.values = torch.cat([_pad_left(mine.values, pad_mine, 2), _pad_left(theirs.values, pad_theirs, 2)])
        self.mask = torch.cat([_pad_left(self.mask, pad_mine, 1), _pad_left(mask, pad_theirs, 1)])
        self.positions, self.last = torch.cat([self.positions, positions]), torch.cat([self.last, last])
        self.slots = self.slots + slots


def generate(model: Any, tokenizer: Any, requests: Sequence[GenerationRequest],
             stop_ids: Sequence[int] = ()) -> list[Delta]:
    """Decode `requests` together to completion: one Delta per request with its whole text (or its error)."""
    batch = DecodeBatch(model, tokenizer, stop_ids)
    results = [Delta("") for _ in requests]
    for i, d in batch.join(list(enumerate(requests))).items():
        results[i].add(d)
    while len(batch):
        for i, d in batch.step().items():
            results[i].add(d)
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


def audit_of(model_id: str, model_path: str, output: str = "output_model") -> dict[str, Any]:
    """The audit record of the `ray-unlearn run` whose output model `model_path` is (<run>/model, beside
    <run>/audit.json), re-checked by `audit.check` (forget items, both models' files, the verdict):
    {"ok", "check" (its one line), "record"}. A 404 when the model is no run's output. For a LoRA adapter,
    `output` = "output_adapter" and `model_path` is the run's <run>/adapter."""
    import json
    from pathlib import Path

    from ray_unlearn import audit

    model = Path(model_path).expanduser().resolve()
    run_dir, missing = model.parent, dict(param="audit", code="audit_not_found")
    record_file = run_dir / audit.AUDIT_FILE
    if not record_file.is_file():
        raise APIError(404, f"model {model_id!r} has no audit record: {run_dir} holds no {audit.AUDIT_FILE} (only "
                            "the model and adapter directories of a `ray-unlearn run` have one)", **missing)
    try:
        record = json.loads(record_file.read_text())
        if output not in record and "output_model" in record:
            raise APIError(404, f"{record_file} records no {output.removeprefix('output_')}, so {model_id!r} "
                                f"({model}) is not that run's output", **missing)
        recorded = Path(record[output]["path"])
    except (ValueError, TypeError, KeyError) as e:
        raise APIError(404, f"{record_file} is not an audit record ({type(e).__name__}: {e})", **missing) from None
    if (run_dir / recorded).resolve() != model:  # an absolute path stays itself under run_dir / it
        raise APIError(404, f"{record_file} records the model {run_dir / recorded}, not {model_id!r} ({model})",
                       **missing)
    try:
        result = audit.check(run_dir)
    except UnlearnError as e:
        raise APIError(404, str(e), **missing) from None
    return {"ok": result.ok, "check": result.line, "record": record}


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
