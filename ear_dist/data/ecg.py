"""ECG (Erase Concept Generator): make prompt pairs from templates or a chat model.

Two sources, both producing de-duplicated ``PromptPair`` lists:

- ``template_pairs``: templates with a ``{concept}`` slot and other named slots filled
  from lists; the surrogate prompt is the same sentence with a surrogate concept.
- ``LLMPairGenerator``: any OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``),
  asked for N pairs per request with a structured prompt, replies parsed as JSON and
  validated, retried with exponential backoff on 429/5xx and network errors, paced by
  a simple rate limit, and cached on disk by request, so a re-run makes no requests.
  The API key is read from the environment variable the config names; it is sent in the
  Authorization header only, never logged, cached or put in an error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import string
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ear_dist.data.pairs import PromptPair, normalize_prompt
from ear_dist.errors import EXIT_RUN_FAILURE, InputError

log = logging.getLogger(__name__)


class ECGError(InputError, RuntimeError):
    """Pair generation that cannot go on (bad template, endpoint refusing, no key)."""


class ECGEndpointError(ECGError):
    """The LLM endpoint failed while the settings were fine (unreachable, server errors): a run failure."""

    exit_code = EXIT_RUN_FAILURE


# --------------------------------------------------------------------------- templates


def _template_slots(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ECGError(f"template {template!r}: {e}") from None


def template_pairs(
    concept: str,
    templates: list[str],
    surrogates: list[str],
    slots: Optional[dict[str, list[str]]] = None,
    num_pairs: int = 0,
    seed: int = 0,
    category: str = "",
) -> list[PromptPair]:
    """Fill ``templates`` into target/surrogate pairs.

    Every template must contain ``{concept}``; other ``{name}`` slots take values from
    ``slots[name]``. With ``num_pairs == 0`` every combination is produced (in a fixed
    order); otherwise ``num_pairs`` distinct combinations are drawn with ``seed``.
    """
    slots = slots or {}
    if not templates:
        raise ECGError("ecg.templates is empty: give at least one template with a {concept} slot")
    if not surrogates:
        raise ECGError("ecg.surrogates is empty: give at least one surrogate concept")
    parsed = []
    for t in templates:
        names = _template_slots(t)
        if "concept" not in names:
            raise ECGError(f"template {t!r}: has no {{concept}} slot")
        for name in names:
            if name != "concept" and not slots.get(name):
                raise ECGError(f"template {t!r}: slot {{{name}}} has no values in ecg.slots")
        parsed.append((t, sorted(set(n for n in names if n != "concept"))))

    def combinations():
        for t, names in parsed:
            total = 1
            for n in names:
                total *= len(slots[n])
            for flat in range(total):
                values = {}
                for n in names:
                    flat, k = divmod(flat, len(slots[n]))
                    values[n] = slots[n][k]
                for s in surrogates:
                    yield t, values, s

    total = sum(math.prod(len(slots[n]) for n in names) * len(surrogates) for _, names in parsed)
    if num_pairs and num_pairs < total:
        rng = random.Random(seed)
        chosen = sorted(rng.sample(range(total), num_pairs))
        picked = set(chosen)
        combos = [c for i, c in enumerate(combinations()) if i in picked]
        rng.shuffle(combos)
    else:
        combos = list(combinations())
    pairs, seen = [], set()
    for t, values, surrogate in combos:
        pair = PromptPair(
            target=t.format(concept=concept, **values),
            surrogate=t.format(concept=surrogate, **values),
            concept=concept,
            surrogate_concept=surrogate,
            category=category,
            source="ecg-template",
        )
        key = (normalize_prompt(pair.target), normalize_prompt(pair.surrogate))
        if key not in seen:
            seen.add(key)
            pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- chat endpoint

_SYSTEM_PROMPT = (
    "You write prompt pairs for testing whether a text-to-image model has forgotten a concept. "
    "You answer with JSON only, no prose and no code fences."
)

_USER_PROMPT = """Concept to erase: "{concept}"{category_line}

Write {n} new prompt pairs. For each pair:
- "target": a vivid, concrete image prompt (one sentence, 8-30 words) in which "{concept}" is the clear subject or a clearly visible part of the image; it must contain the word "{concept}".
- "surrogate": the same sentence with "{concept}" swapped for one different, ordinary concept, changing as few other words as needed so that the image would no longer show "{concept}" at all.
- "surrogate_concept": the word or short phrase that replaced "{concept}".

Vary scenes, viewpoints, lighting, styles and surrogate concepts across pairs; do not repeat a sentence. This is batch {batch} of a larger set, so make these different from what a first attempt would give.{avoid_block}

Reply with exactly this JSON shape:
{{"pairs": [{{"target": "...", "surrogate": "...", "surrogate_concept": "..."}}]}}"""


@dataclass
class LLMStats:
    """What a generation run did: requests sent, cache hits, retries and what was rejected."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    invalid_replies: int = 0
    duplicates: int = 0
    rejected: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"requests {self.requests}, cache hits {self.cache_hits}, retries {self.retries}, "
            f"unparseable replies {self.invalid_replies}, duplicates {self.duplicates}, rejected pairs: {rejected}"
        )


def extract_json(content: str) -> object:
    """Parse a chat reply as JSON, tolerating code fences and text around one JSON object."""
    text = content.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start >= 0 and end > start:
            return json.loads(text[start : end + 1])
        raise


def mentions(text: str, concept: str) -> bool:
    """Whether ``text`` names ``concept`` as a word (case-insensitive)."""
    return re.search(r"(?<!\w)" + re.escape(concept.lower()) + r"(?!\w)", text.lower()) is not None


def validate_pair(item: object, concept: str, require_concept_word: bool = True) -> tuple[Optional[dict], str]:
    """Check one generated pair; returns (clean dict, "") or (None, reason)."""
    if not isinstance(item, dict):
        return None, "not an object"
    clean = {}
    for name in ("target", "surrogate"):
        value = item.get(name)
        if not isinstance(value, str) or not value.strip():
            return None, f"field '{name}' missing or empty"
        clean[name] = " ".join(value.split())
    surrogate_concept = item.get("surrogate_concept", "")
    clean["surrogate_concept"] = surrogate_concept.strip() if isinstance(surrogate_concept, str) else ""
    if normalize_prompt(clean["target"]) == normalize_prompt(clean["surrogate"]):
        return None, "target equals surrogate"
    if require_concept_word and not mentions(clean["target"], concept):
        return None, "target does not mention the concept"
    if mentions(clean["surrogate"], concept):
        return None, "surrogate still mentions the concept"
    return clean, ""


@dataclass
class LLMSettings:
    base_url: str
    models: list[str]
    api_key_env: str = ""
    pairs_per_request: int = 10
    temperature: float = 1.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    requests_per_minute: float = 60.0
    timeout_s: float = 60.0
    cache_dir: str = ""
    # most requests one run may send; 0 = three times what num_pairs needs
    max_requests: int = 0
    require_concept_word: bool = True


class LLMPairGenerator:
    """Ask an OpenAI-compatible chat endpoint for prompt pairs (see the module docstring).

    ``sleep`` and ``clock`` are injectable so tests need not wait for real backoff.
    """

    def __init__(
        self,
        settings: LLMSettings,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not settings.base_url:
            raise ECGError("ecg.llm_base_url is empty: give the endpoint, e.g. http://127.0.0.1:8000/v1")
        if not settings.models:
            raise ECGError("ecg.llm_models is empty: name at least one model")
        if settings.pairs_per_request < 1:
            raise ECGError(f"ecg.llm_pairs_per_request must be >= 1, got {settings.pairs_per_request}")
        self.settings = settings
        self.sleep = sleep
        self.clock = clock
        self.stats = LLMStats()
        self._last_request = -math.inf
        self._api_key = ""
        if settings.api_key_env:
            if settings.api_key_env not in os.environ:
                raise ECGError(f"environment variable {settings.api_key_env} (ecg.llm_api_key_env) is not set")
            self._api_key = os.environ[settings.api_key_env]

    def __repr__(self) -> str:  # keeps the key out of any repr-based logging
        return f"LLMPairGenerator(base_url={self.settings.base_url!r}, models={self.settings.models!r})"

    # -- one request
    def _messages(self, concept: str, category: str, batch: int, avoid: list[str]) -> list[dict]:
        avoid_block = ""
        if avoid:
            avoid_block = "\nDo not reuse these targets from earlier batches:\n" + "\n".join(f"- {a}" for a in avoid)
        user = _USER_PROMPT.format(
            concept=concept,
            category_line=f' (category: "{category}")' if category else "",
            n=self.settings.pairs_per_request,
            batch=batch + 1,
            avoid_block=avoid_block,
        )
        return [{"role": "system", "content": _SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def _cache_path(self, body: dict) -> Optional[Path]:
        if not self.settings.cache_dir:
            return None
        key_source = json.dumps({"base_url": self.settings.base_url.rstrip("/"), "body": body}, sort_keys=True)
        return Path(self.settings.cache_dir) / (hashlib.sha256(key_source.encode()).hexdigest() + ".json")

    def _pace(self) -> None:
        if self.settings.requests_per_minute > 0:
            wait = self._last_request + 60.0 / self.settings.requests_per_minute - self.clock()
            if wait > 0:
                self.sleep(wait)
        self._last_request = self.clock()

    def _post(self, body: dict) -> str:
        """POST one chat completion; retries 429/5xx/network errors; returns the reply text."""
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = "Bearer " + self._api_key
        last_error = ""
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                self.stats.retries += 1
            self._pace()
            self.stats.requests += 1
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                snippet = e.read()[:300].decode("utf-8", errors="replace")
                last_error = f"HTTP {e.code} from {url}: {snippet}"
                if e.code != 429 and e.code < 500:
                    raise ECGError(last_error) from None  # the request itself is refused: key, model, body
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last_error = f"cannot reach {url}: {getattr(e, 'reason', e)}"
            else:
                try:
                    reply = json.loads(payload)
                    return reply["choices"][0]["message"]["content"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
                    last_error = f"{url}: not an OpenAI chat completion reply ({type(e).__name__}: {e})"
            if attempt == self.settings.max_retries:
                break
            delay = min(self.settings.max_backoff_s, self.settings.backoff_s * (2**attempt))
            if retry_after is not None:
                try:
                    delay = max(delay, min(self.settings.max_backoff_s, float(retry_after)))
                except ValueError:
                    pass
            log.warning("%s; retry %d/%d in %.1fs", last_error, attempt + 1, self.settings.max_retries, delay)
            self.sleep(delay)
        raise ECGEndpointError(f"{last_error} (gave up after {self.settings.max_retries + 1} attempts)")

    def _complete(self, body: dict) -> str:
        cache = self._cache_path(body)
        if cache is not None and cache.is_file():
            try:
                content = json.loads(cache.read_text(encoding="utf-8"))["content"]
                self.stats.cache_hits += 1
                return content
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                log.warning("ignoring unreadable cache entry %s", cache)
        content = self._post(body)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"body": body, "content": content}, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, cache)
        return content

    # -- a whole run
    def generate(self, concept: str, num_pairs: int, category: str = "") -> list[PromptPair]:
        """Request batches until ``num_pairs`` distinct valid pairs exist or the request cap is hit."""
        if num_pairs < 1:
            raise ECGError(f"ecg.num_pairs must be >= 1, got {num_pairs}")
        per_request = self.settings.pairs_per_request
        max_requests = self.settings.max_requests or 3 * math.ceil(num_pairs / per_request)
        pairs: list[PromptPair] = []
        seen: set[tuple[str, str]] = set()
        for batch in range(max_requests):
            if len(pairs) >= num_pairs:
                break
            model = self.settings.models[batch % len(self.settings.models)]
            # the last few targets steer the model away from repeats; part of the cache key
            avoid = [p.target for p in pairs[-5:]]
            body = {
                "model": model,
                "messages": self._messages(concept, category, batch, avoid),
                "temperature": self.settings.temperature,
            }
            content = self._complete(body)
            try:
                parsed = extract_json(content)
            except json.JSONDecodeError:
                self.stats.invalid_replies += 1
                log.warning("batch %d from %s: the reply is not JSON; skipping it", batch + 1, model)
                self._forget(body)
                continue
            items = parsed.get("pairs") if isinstance(parsed, dict) else parsed
            if not isinstance(items, list):
                self.stats.invalid_replies += 1
                log.warning("batch %d from %s: no 'pairs' list in the reply; skipping it", batch + 1, model)
                self._forget(body)
                continue
            for item in items:
                clean, reason = validate_pair(item, concept, self.settings.require_concept_word)
                if clean is None:
                    self.stats.rejected[reason] += 1
                    continue
                key = (normalize_prompt(clean["target"]), normalize_prompt(clean["surrogate"]))
                if key in seen:
                    self.stats.duplicates += 1
                    continue
                seen.add(key)
                pairs.append(PromptPair(
                    target=clean["target"], surrogate=clean["surrogate"], concept=concept,
                    surrogate_concept=clean["surrogate_concept"], category=category, source=f"ecg-llm:{model}",
                ))
                if len(pairs) >= num_pairs:
                    break
        log.info("ECG: %d pairs for %r; %s", len(pairs), concept, self.stats.summary())
        return pairs

    def _forget(self, body: dict) -> None:
        """Drop an unusable reply from the cache, so a re-run asks again."""
        cache = self._cache_path(body)
        if cache is not None:
            cache.unlink(missing_ok=True)
