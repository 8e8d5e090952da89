"""Query decomposition for "1+N" multi-vector retrieval (HiMIR / POQD style).

A text query such as ``"a dog with a red ball next to a man holding an umbrella"``
is searched twice over: whole (the "1") and as a few short sub-queries, one per
object it mentions (the "N"): ``["a dog", "a red ball", "a man", "an umbrella"]``.
Each sub-query is matched against image segments and the scores are pooled.

Two decomposers are provided, both behind the :class:`QueryDecomposer` interface,
whose :meth:`~QueryDecomposer.decompose` returns *only* the sub-queries (never the
full query), deduplicated, in query order, at most ``max_parts`` of them:

:class:`RulesDecomposer`
    Offline and deterministic. Splits on punctuation, conjunctions, spatial and
    action relations ("next to", "holding", "riding", ...), auxiliaries and
    relative pronouns, trims verbs and connectors from the edges of each piece
    and drops pieces with no content word. Never raises on any string.
:class:`LLMDecomposer`
    Asks any OpenAI-compatible chat endpoint (llama.cpp, vLLM, ...) for a strict
    JSON array of short noun phrases, using only :mod:`urllib.request`. The reply
    is validated strictly; on *any* failure (connection refused, timeout, HTTP
    error, malformed or empty reply) a warning is logged on the
    ``finegrain.decompose`` logger and the result of the fallback decomposer
    (by default a :class:`RulesDecomposer`) is returned instead, so retrieval
    never fails because the LLM is missing or misbehaves.

:func:`decompose_query` builds the "1+N" list (full query first) and
:func:`create_decomposer` builds a decomposer from a short spec string
(``"rules"`` or ``"llm:<url>#<model>"``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from typing import Any

__all__ = [
    "QueryDecomposer",
    "RulesDecomposer",
    "LLMDecomposer",
    "decompose_query",
    "create_decomposer",
    "MAX_PART_CHARS",
]

logger = logging.getLogger("finegrain.decompose")

#: Longest sub-query any decomposer returns, in characters.
MAX_PART_CHARS = 200


def _dedupe_key(text: str) -> str:
    return " ".join(text.casefold().split())


class QueryDecomposer(ABC):
    """Splits a text query into sub-queries.

    Attributes
    ----------
    max_parts : int
        Upper bound on the number of sub-queries returned.
    """

    max_parts: int

    @abstractmethod
    def decompose(self, query: str) -> list[str]:
        """Return the sub-queries of ``query``.

        Parameters
        ----------
        query : str
            The full text query.

        Returns
        -------
        list of str
            Only the sub-queries (the full query itself is not included),
            deduplicated case-insensitively, in query order, at most
            ``max_parts`` items, each non-empty and at most
            :data:`MAX_PART_CHARS` characters. ``[]`` means "use the full
            query alone".
        """


# --------------------------------------------------------------------------- rules

# Multi-word relations; whitespace inside them matches any run of whitespace.
_PHRASE_SEPARATORS = (
    "in front of", "in the front of", "on top of", "in the middle of", "at the top of",
    "at the bottom of", "on the edge of", "at the edge of", "on the side of",
    "by the side of", "in the back of", "at the back of", "on the back of",
    "to the left of", "to the right of", "on the left of", "on the right of",
    "close to", "next to", "near to", "far from", "out of", "away from", "across from",
    "along with", "together with", "as well as", "instead of",
    "playing with", "playing in", "playing on", "sitting on", "sitting in", "sitting at",
    "sitting next to", "standing on", "standing in", "standing next to", "standing by",
    "lying on", "lying in", "laying on", "laying in", "leaning on", "leaning against",
    "looking at", "looking into", "walking with", "walking on", "walking in", "walking down",
    "running on", "running in", "running through", "running after", "jumping over",
    "jumping into", "covered with", "covered in", "filled with", "dressed in", "dressed as",
    "surrounded by", "in between",
)

_SINGLE_SEPARATORS = (
    # conjunctions
    "and", "or", "but", "while", "whilst", "as", "plus", "then", "whereas", "nor",
    # relative pronouns / clause openers
    "who", "that", "which", "whose", "whom", "where", "when",
    # auxiliaries / copulas
    "is", "are", "was", "were", "be", "being", "been", "am", "has", "have", "had",
    # prepositions and spatial relations
    "with", "beside", "besides", "alongside", "near", "nearby", "on", "onto", "upon", "in",
    "into", "inside", "within", "under", "underneath", "beneath", "below", "over", "above",
    "atop", "behind", "at", "by", "through", "across", "along", "around", "against",
    "between", "among", "amongst", "amid", "beyond", "toward", "towards", "past", "from",
    "after", "to", "outside", "via", "up", "down", "off",
    # transitive actions whose object is a separate thing
    "holding", "holds", "wearing", "wears", "carrying", "carries", "riding", "rides",
    "pushing", "pushes", "pulling", "pulls", "throwing", "throws", "catching", "catches",
    "kicking", "kicks", "chasing", "chases", "hugging", "hugs", "feeding", "feeds",
    "watching", "watches", "eating", "eats", "drinking", "drinks", "using", "uses",
    "petting", "walking", "walks", "hitting", "hits", "grabbing", "grabs", "biting",
    "bites", "touching", "touches", "approaching", "approaches", "following", "follows",
    "leading", "leads", "driving", "drives", "climbing", "climbs", "cutting", "cuts",
)

_WORD_EDGE_BEFORE = r"(?<![\w'’\-])"
_WORD_EDGE_AFTER = r"(?![\w'’\-])"


def _build_split_re() -> re.Pattern[str]:
    words = sorted({*_PHRASE_SEPARATORS, *_SINGLE_SEPARATORS}, key=lambda w: (-len(w), w))
    alternatives = "|".join(r"\s+".join(re.escape(part) for part in w.split()) for w in words)
    punctuation = r"[,;:!?()\[\]{}\"“”«»|/&+…]|\.(?=\s|$)|\s[-–—]+\s|[–—]"
    return re.compile(
        rf"(?:{punctuation})|{_WORD_EDGE_BEFORE}(?:{alternatives}){_WORD_EDGE_AFTER}",
        re.IGNORECASE,
    )


_SPLIT_RE = _build_split_re()
_TOKEN_RE = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")

# Words trimmed from either edge of a piece (connectors, verbs, pronouns).
_CONNECTORS = frozenset(
    set(_SINGLE_SEPARATORS)
    | {
        "of", "for", "about", "before", "so", "yet", "if", "than", "like", "out", "next",
        "there", "here", "also", "very", "just", "still", "currently", "together", "each",
        "other", "it", "it's", "they", "them", "he", "she", "him", "i", "we", "you",
        "us", "me", "themselves", "himself", "herself", "itself", "do", "does", "did",
        "can", "could", "will", "would", "may", "might", "appears", "seems", "looks",
        "runs", "sits", "stands", "plays", "jumps", "lies", "lays", "leans", "smiles",
        "poses", "waits", "stares", "swims", "sleeps", "dances", "skates", "surfs", "skis",
        "performs", "talks", "works", "reads", "goes", "gets", "made", "dressed", "covered",
        "filled", "parked", "seated", "lined", "surrounded", "stacked", "painted",
        "decorated", "attached", "placed", "shown", "seen", "taken", "pictured",
    }
)

# Kept at the start of a piece ("a red ball") but not counted as content.
_DETERMINERS = frozenset(
    {
        "a", "an", "the", "this", "these", "those", "some", "any", "his", "her", "its", "their",
        "my", "your", "our", "another", "several", "many", "few", "one", "two",
        "three", "four", "five", "six", "seven", "eight", "nine", "ten", "both", "all",
        "no", "every", "lots", "lot", "group", "couple", "pair", "bunch",
    }
)

# Words ending in -ing that are nouns, not gerunds.
_ING_NOUNS = frozenset(
    {
        "building", "buildings", "ceiling", "clothing", "wedding", "swing", "string",
        "thing", "something", "anything", "everything", "nothing", "evening", "morning",
        "painting", "sibling", "pudding", "spring", "railing", "awning", "icing",
        "frosting", "crossing", "parking", "lightning", "ring", "king", "wing", "sling",
        "earring", "bedding", "stuffing", "filling", "dumpling", "duckling", "sapling",
        "seedling", "viking", "stocking", "landing", "opening", "siding", "setting",
        "clearing", "gathering", "meeting", "outing", "bowling",
        "drawing", "carving", "housing", "shilling", "herring", "darling", "inning",
        "wiring", "lining", "dining", "ping", "sing", "bling",
    }
)


def _norm_word(token: str) -> str:
    return token.casefold().replace("’", "'")


def _is_verbish(word: str) -> bool:
    """True for gerunds such as "running" (``word`` already normalised)."""
    return len(word) >= 5 and word.endswith("ing") and word not in _ING_NOUNS


def _is_edge_trimmable(word: str) -> bool:
    return word in _CONNECTORS or _is_verbish(word)


def _is_content(word: str) -> bool:
    if word in _CONNECTORS or word in _DETERMINERS or _is_verbish(word):
        return False
    return not word.isdigit()


def _clip(text: str, limit: int = MAX_PART_CHARS) -> str:
    """Cut ``text`` to at most ``limit`` characters, at a word boundary when possible."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = max(head.rfind(" "), head.rfind("\t"), head.rfind("\n"))
    if cut >= limit // 2:  # a word boundary that keeps most of the text
        head = head[:cut]
    return head.rstrip(" \t\r\n,;:.-–—")


class RulesDecomposer(QueryDecomposer):
    """Offline, deterministic rule-based query decomposer.

    The query is split at punctuation (commas, semicolons, ...), conjunctions
    ("and", "or", "while", "as", "but"), relative pronouns ("who", "that",
    "which"), auxiliaries ("is", "are") and relations ("with", "next to",
    "in front of", "on", "under", "holding", "wearing", "riding",
    "playing with", "sitting on", ...). Connectors, pronouns and verbs are then
    trimmed from the edges of each piece ("running after a white dog" becomes
    "a white dog"), the original text of what remains is kept (case and inner
    punctuation untouched), and pieces with fewer than ``min_words`` content
    words ("is", "the", "it", "running") are dropped.

    A query with no split point, or whose split leaves fewer than two pieces,
    yields ``[]``: a single sub-query adds nothing over the full query.

    Parameters
    ----------
    max_parts : int, default 4
        Most sub-queries returned (the first ones in query order).
    min_words : int, default 1
        Fewest content words (not stop words, determiners, verbs or numbers)
        a piece needs to be kept.

    Examples
    --------
    >>> RulesDecomposer().decompose("a dog with a red ball next to a man holding an umbrella")
    ['a dog', 'a red ball', 'a man', 'an umbrella']
    >>> RulesDecomposer().decompose("a brown dog")
    []
    """

    def __init__(self, max_parts: int = 4, min_words: int = 1) -> None:
        if isinstance(max_parts, bool) or not isinstance(max_parts, int) or max_parts < 1:
            raise ValueError(f"max_parts must be a positive integer, got {max_parts!r}")
        if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 1:
            raise ValueError(f"min_words must be a positive integer, got {min_words!r}")
        self.max_parts = max_parts
        self.min_words = min_words

    def __repr__(self) -> str:
        return f"RulesDecomposer(max_parts={self.max_parts}, min_words={self.min_words})"

    def decompose(self, query: str) -> list[str]:
        """Split ``query`` into sub-queries; see :meth:`QueryDecomposer.decompose`.

        Never raises: an empty, whitespace-only or non-string input gives ``[]``.
        """
        if not isinstance(query, str) or not query.strip():
            return []
        try:
            return self._decompose(query)
        except Exception as exc:  # pragma: no cover - safety net, rules are total
            logger.warning("rule-based decomposition failed (%r); using the full query only", exc)
            return []

    def _decompose(self, query: str) -> list[str]:
        pieces = _SPLIT_RE.split(query)
        if len(pieces) < 2:
            return []
        parts: list[str] = []
        seen: set[str] = set()
        for piece in pieces:
            part = self._clean(piece)
            if part is None:
                continue
            key = _dedupe_key(part)
            if key in seen:
                continue
            seen.add(key)
            parts.append(part)
        if len(parts) < 2:
            return []
        return parts[: self.max_parts]

    def _clean(self, piece: str) -> str | None:
        tokens = list(_TOKEN_RE.finditer(piece))
        if not tokens:
            return None
        words = [_norm_word(t.group()) for t in tokens]
        start, end = 0, len(tokens) - 1
        while start <= end and _is_edge_trimmable(words[start]):
            start += 1
        while end >= start and (_is_edge_trimmable(words[end]) or words[end] in _DETERMINERS):
            end -= 1
        if start > end:
            return None
        if sum(_is_content(w) for w in words[start : end + 1]) < self.min_words:
            return None
        text = _clip(piece[tokens[start].start() : tokens[end].end()].strip())
        return text or None


def decompose_query(query: str, decomposer: QueryDecomposer | None = None) -> list[str]:
    """Return the "1+N" query list: the full query first, then its sub-queries.

    Parameters
    ----------
    query : str
        The full text query; returned unchanged as the first item.
    decomposer : QueryDecomposer, optional
        Defaults to ``RulesDecomposer()``.

    Returns
    -------
    list of str
        ``[query, *sub_queries]`` where sub-queries equal to the full query
        (case-insensitively, ignoring surrounding whitespace) or to an earlier
        item are removed.

    Examples
    --------
    >>> decompose_query("a woman holding an umbrella, and a dog")
    ['a woman holding an umbrella, and a dog', 'a woman', 'an umbrella', 'a dog']
    """
    if decomposer is None:
        decomposer = RulesDecomposer()
    result = [query]
    seen = {_dedupe_key(query) if isinstance(query, str) else query}
    for part in decomposer.decompose(query):
        key = _dedupe_key(part)
        if not key or key in seen:
            continue
        seen.add(key)
        result.append(part)
    return result


# --------------------------------------------------------------------------- LLM

# Worded for small local models too (tried on SmolLM2-135M-Instruct): the examples are not the
# queries of the tests or docs, so a model that copies an example is not rewarded there.
_SYSTEM_PROMPT = """\
You split image-search queries into the visual objects they mention.
Reply with ONLY a JSON array of strings: one short noun phrase per object, copied from \
the query with its attributes, in query order, at most {max_parts} items. Leave out verbs, \
prepositions and relations (with, in, on, next to, holding, riding).
Examples:
a cat on a sofa next to a lamp -> ["a cat", "a sofa", "a lamp"]
a boy in a blue jacket throwing a frisbee -> ["a boy", "a blue jacket", "a frisbee"]
an old man with a white beard reading a newspaper -> ["an old man", "a white beard", "a newspaper"]
a plate of pasta and a fork on a table -> ["a plate of pasta", "a fork", "a table"]"""

#: Longest item the reply schema allows (the prompt asks for short noun phrases).
_SCHEMA_PART_CHARS = 80

_MAX_REPLY_BYTES = 1 << 20
_MAX_QUERY_CHARS = 2000
_MAX_BRACKET_TRIES = 32


class _BadReply(ValueError):
    """The server answered, but not with a usable list of sub-queries."""


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.casefold() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _chat_endpoint(url: str) -> str:
    """``http://h:p`` or ``http://h:p/v1`` -> ``http://h:p/v1/chat/completions``."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("url must be a non-empty http(s) URL")
    base = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must be an http(s) URL such as http://127.0.0.1:8080, got {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        return base
    if re.search(r"/v\d+$", path):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def _extract_array(content: str) -> list[Any]:
    """Return the first JSON array in ``content`` (prose and code fences around it are ignored)."""
    decoder = json.JSONDecoder()
    position = content.find("[")
    tries = 0
    while position != -1 and tries < _MAX_BRACKET_TRIES:
        tries += 1
        try:
            value, _ = decoder.raw_decode(content, position)
        except ValueError:
            value = None
        if isinstance(value, list):
            return value
        position = content.find("[", position + 1)
    raise _BadReply(f"no JSON array in the reply: {content[:80]!r}")


class LLMDecomposer(QueryDecomposer):
    """Query decomposer backed by an OpenAI-compatible chat completions server.

    Sends ``POST {url}/v1/chat/completions`` (or ``{url}/chat/completions`` when
    ``url`` already ends in ``/v1``) with a system prompt asking for a strict JSON
    array of short noun phrases, ``temperature=0``, ``max_tokens=128`` and
    ``response_format={"type": "json_object", "schema": <array of strings>}``,
    which llama.cpp servers (llama-cpp-python, llama-server) turn into a grammar
    so that even a small model such as SmolLM2-135M answers with a JSON array.
    A server that answers HTTP 400, 422 or 500 is asked once more without
    ``response_format``; if that succeeds, this decomposer leaves it out from
    then on. The first ``[...]`` in the reply is parsed; every item must be a
    non-empty string of at most :data:`MAX_PART_CHARS` characters. On any failure
    a warning is logged on the ``finegrain.decompose`` logger and
    ``fallback.decompose(query)`` is returned. Only the standard library is used
    for HTTP; loopback hosts are reached directly, other hosts honour the usual
    ``*_proxy`` variables.

    Parameters
    ----------
    url : str
        Server base URL, e.g. ``"http://127.0.0.1:8080"`` or ``"http://host/v1"``.
    model : str
        Model name sent in the request (llama.cpp servers accept any name).
    timeout : float, default 10.0
        Seconds allowed for connecting, for each read, and for the whole reply.
    max_parts : int, default 4
        Most sub-queries returned.
    fallback : QueryDecomposer, optional
        Used whenever the LLM fails; defaults to ``RulesDecomposer(max_parts)``.
    api_key : str, optional
        Sent as ``Authorization: Bearer <api_key>`` when given.
    """

    def __init__(
        self,
        url: str,
        model: str,
        timeout: float = 10.0,
        max_parts: int = 4,
        fallback: QueryDecomposer | None = None,
        api_key: str | None = None,
    ) -> None:
        if isinstance(max_parts, bool) or not isinstance(max_parts, int) or max_parts < 1:
            raise ValueError(f"max_parts must be a positive integer, got {max_parts!r}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(model, str) or not model.strip():
            raise ValueError("model must be a non-empty string")
        self.url = url
        self.endpoint = _chat_endpoint(url)
        self.model = model
        self.timeout = float(timeout)
        self.max_parts = max_parts
        self.fallback = fallback if fallback is not None else RulesDecomposer(max_parts=max_parts)
        self.api_key = api_key
        # Cleared once the server has rejected response_format and answered without it.
        self._use_response_format = True

    def __repr__(self) -> str:
        return (
            f"LLMDecomposer(url={self.url!r}, model={self.model!r}, timeout={self.timeout}, "
            f"max_parts={self.max_parts}, fallback={self.fallback!r})"
        )

    def decompose(self, query: str) -> list[str]:
        """Ask the LLM for sub-queries; fall back to ``self.fallback`` on any failure.

        See :meth:`QueryDecomposer.decompose`. Never raises because of the server.
        """
        if not isinstance(query, str) or not query.strip():
            return []
        try:
            return self._ask(query)
        except Exception as exc:  # noqa: BLE001 - every failure falls back
            logger.warning(
                "LLM query decomposition via %s failed (%s); falling back to %r",
                self.endpoint, _describe(exc), self.fallback,
            )
        return list(self.fallback.decompose(query))[: self.max_parts]

    # -- internals ---------------------------------------------------------

    def _request_body(self, query: str, response_format: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": _SYSTEM_PROMPT.format(max_parts=self.max_parts)},
                {"role": "user", "content": query[:_MAX_QUERY_CHARS]},
            ],
            "temperature": 0,
            "max_tokens": 128,
            "stream": False,
        }
        if response_format:
            body["response_format"] = {
                "type": "json_object",
                "schema": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": _SCHEMA_PART_CHARS},
                    "minItems": 1,
                    "maxItems": self.max_parts,
                },
            }
        return body

    def _complete(self, query: str) -> bytes:
        """POST the request; once without ``response_format`` if the server rejects that field."""
        if not self._use_response_format:
            return self._post(self._request_body(query, response_format=False))
        try:
            return self._post(self._request_body(query))
        except urllib.error.HTTPError as exc:
            if exc.code not in (400, 422, 500):  # llama-cpp-python reports a bad field as 500
                raise
            exc.close()
        raw = self._post(self._request_body(query, response_format=False))
        logger.info("%s rejected response_format; asking without it from now on", self.endpoint)
        self._use_response_format = False
        return raw

    def _post(self, body: dict[str, Any]) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )
        if _is_loopback(urllib.parse.urlsplit(self.endpoint).hostname):
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        else:
            opener = urllib.request.build_opener()
        deadline = time.monotonic() + self.timeout
        with opener.open(request, timeout=self.timeout) as response:
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = response.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > _MAX_REPLY_BYTES:
                    raise _BadReply(f"reply larger than {_MAX_REPLY_BYTES} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reply not complete within {self.timeout:g} s")
        return b"".join(chunks)

    def _ask(self, query: str) -> list[str]:
        raw = self._complete(query)
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _BadReply(f"response is not JSON: {raw[:80]!r}") from exc
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise _BadReply("response has no choices[0].message.content") from exc
        if not isinstance(content, str):
            raise _BadReply(f"message content is {type(content).__name__}, not a string")
        items = _extract_array(content)
        if not items:
            raise _BadReply("the model returned an empty list")
        full = _dedupe_key(query)
        parts: list[str] = []
        seen: set[str] = set()
        for item in items:
            if not isinstance(item, str):
                raise _BadReply(f"list item {item!r} is not a string")
            text = item.strip()
            if len(text) > MAX_PART_CHARS:
                raise _BadReply(f"list item longer than {MAX_PART_CHARS} characters")
            key = _dedupe_key(text)
            if not key or key == full or key in seen:
                continue
            seen.add(key)
            parts.append(text)
        if not parts:
            raise _BadReply("no usable sub-query in the list")
        return parts[: self.max_parts]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return f"timed out: {reason}"
        return f"connection error: {reason}"
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}"
    if isinstance(exc, _BadReply):
        return f"bad reply: {exc}"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- factory


def create_decomposer(spec: str) -> QueryDecomposer:
    """Build a decomposer from a spec string.

    Parameters
    ----------
    spec : str
        ``"rules"`` for :class:`RulesDecomposer`, or ``"llm:<url>#<model>"``
        (e.g. ``"llm:http://127.0.0.1:8080#smollm2"``) for an
        :class:`LLMDecomposer` that falls back to the rules.

    Returns
    -------
    QueryDecomposer

    Raises
    ------
    ValueError
        For any other spec; the message lists the valid forms.
    """
    valid = "valid forms: 'rules', 'llm:<url>#<model>' (e.g. 'llm:http://127.0.0.1:8080#smollm2')"
    text = spec.strip() if isinstance(spec, str) else ""
    if text.casefold() == "rules":
        return RulesDecomposer()
    if text[:4].casefold() == "llm:":
        url, sep, model = text[4:].rpartition("#")
        if sep and url.strip() and model.strip():
            try:
                return LLMDecomposer(url.strip(), model.strip())
            except ValueError as exc:
                raise ValueError(f"bad decomposer spec {spec!r}: {exc}; {valid}") from exc
    raise ValueError(f"unknown decomposer spec {spec!r}; {valid}")
