"""Content policy and PII detection for prompts, generated text and training corpora.

A policy is a list of rules (terms, regular expressions, PII kinds), each with an action:
`block`, `redact` or `warn`. One engine serves a whole text (`Policy.check`) and a stream of
pieces (`Policy.stream_filter`): a whole text is a stream of one piece, so both give the same
answer by construction, however the stream happens to be cut.

How matches are chosen. The engine scans left to right. At each point it takes the match that
starts first; at equal starts the stronger action wins (block > redact > warn), then the longer
match, then the earlier rule. A match never hides a stronger one that starts inside it: a
redaction with a blocked match inside becomes a block, and a warning with a redaction or block
inside ends where that one begins. So a text is blocked exactly when a block rule matches
anywhere in it.

How streaming stays safe. Every matcher is bounded: it knows the longest text a match (with its
look-ahead) can reach, and PII matchers also know which characters a match can be made of. So
for the text seen so far each matcher can name its "frontier": the first position where a match
might start that later text could still change. The filter releases text only up to the
smallest frontier, so it never emits a character that a later piece could turn into part of a
blocked or redacted match. What that holds back: for terms, the longest tail that is still a
prefix of a term; for PII, the current run of characters a match can contain (a word, a group
of digits); for regular expressions, the rule's `max_length`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from trustgen.data.pii import (  # noqa: F401 -- find_pii, scrub_pii and Match are part of this module's API
    ALL_KINDS,
    DETECTORS,
    MARGIN,
    PLACEHOLDERS,
    Match,
    find_pii,
    pii_kinds,
    scrub_pii,
)
from trustgen.errors import TrustgenError

Action = Literal["block", "redact", "warn"]
Outcome = Literal["allow", "warn", "redact", "block"]
ACTIONS: tuple[Action, ...] = ("block", "redact", "warn")
SEVERITY: dict[str, int] = {"allow": 0, "warn": 1, "redact": 2, "block": 3}
DEFAULT_REPLACEMENT = "[REDACTED]"
DEFAULT_MAX_LENGTH = 64
# Released text kept before the release point, so look-behinds (\b, (?<!\w), ...) see the same
# characters in a stream as in a whole text; a pattern's look-behind must not reach further.
LOOKBEHIND = 32


# ---- rules ----

@dataclass(frozen=True, kw_only=True)
class Rule:
    """One policy rule: what to look for (terms, a pattern, PII kinds; any mix) and what to do."""

    name: str
    action: Action
    terms: tuple[str, ...] = ()  # whole words or phrases, case-insensitive
    pattern: str | None = None  # a regular expression, case-sensitive unless it says (?i)
    pii: tuple[str, ...] = ()  # PII kinds, or ("all",)
    replacement: str | None = None  # redact only; default [REDACTED], or the PII placeholder
    max_length: int = DEFAULT_MAX_LENGTH  # pattern only: the longest text a match can span

    def __post_init__(self) -> None:
        where = f"policy rule {self.name!r}"
        if self.action not in ACTIONS:
            raise TrustgenError(f"{where} has action {self.action!r}; use block, redact or warn.")
        if not (self.terms or self.pattern or self.pii):
            raise TrustgenError(f"{where} has nothing to match; give it terms, a pattern or pii.")
        if isinstance(self.terms, str):
            raise TrustgenError(f"{where} has terms that is not a list of strings.")
        if any(not isinstance(t, str) or not t.strip() for t in self.terms):
            raise TrustgenError(f"{where} has an empty or non-text entry in terms.")
        if self.pattern is not None:
            try:
                compiled = re.compile(self.pattern)
            except re.error as e:
                raise TrustgenError(f"{where} has an invalid pattern: {e}.") from None
            if compiled.fullmatch(""):
                raise TrustgenError(f"{where} has a pattern that matches empty text.")
        object.__setattr__(self, "terms", tuple(self.terms))
        object.__setattr__(self, "pii", pii_kinds(self.pii, where) if self.pii else ())
        if self.replacement is not None and self.action != "redact":
            raise TrustgenError(f"{where} sets replacement, which only applies to redact rules.")
        if self.max_length < 1:
            raise TrustgenError(f"{where} has max_length {self.max_length}; it must be at least 1.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], index: int = 1) -> Rule:
        """A rule from one [[rule]] table; a rule without a name is called "#index"."""
        name = values.get("name", f"#{index}")
        if not isinstance(name, str) or not name:
            raise TrustgenError(f"policy rule #{index} has a name that is not text.")
        where = f"policy rule {name!r}"
        known = ("name", "action", "terms", "pattern", "pii", "replacement", "max_length")
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TrustgenError(f"{where} has unknown field(s) {', '.join(unknown)}; "
                                f"valid fields are {', '.join(known)}.")
        if "action" not in values:
            raise TrustgenError(f"{where} has no action; set action to block, redact or warn.")
        for key, kind, described in (("pattern", str, "text"), ("replacement", str, "text"),
                                     ("max_length", int, "a whole number")):
            value = values.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise TrustgenError(f"{where} has {key} {value!r}, which is not {described}.")
        if "max_length" in values and "pattern" not in values:
            raise TrustgenError(f"{where} sets max_length, which only applies to a pattern.")
        lists = {}
        for key in ("terms", "pii"):
            value = values.get(key, [])
            if key == "pii" and value == "all":
                value = ["all"]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TrustgenError(f"{where} has {key} that is not a list of strings.")
            lists[key] = tuple(value)
        return cls(name=name, action=values["action"], pattern=values.get("pattern"),
                   replacement=values.get("replacement"),
                   max_length=values.get("max_length", DEFAULT_MAX_LENGTH), **lists)


class _Finder(Protocol):
    kind: str

    def search(self, text: str, pos: int) -> tuple[int, int] | None:
        """The first match starting at or after `pos`. Whether a match starts at a position
        must not depend on `pos`: the stream moves `pos` forward over text without matches."""

    def frontier(self, text: str, pos: int) -> int:
        """The first position at or after `pos` where more text could still change whether
        (and how) a match starts there; len(text) if there is none."""


class _Terms:
    """Whole words or phrases, case-insensitive; the longest term wins at one position."""

    kind = "term"

    def __init__(self, terms: Sequence[str]) -> None:
        ordered = sorted(terms, key=len, reverse=True)
        self.regex = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, ordered)) + r")(?!\w)",
                                re.IGNORECASE)
        # Every non-empty prefix of every term, compared the same case-insensitive way.
        prefixes = sorted({t[:k] for t in terms for k in range(1, len(t) + 1)})
        self.prefix = re.compile("|".join(map(re.escape, prefixes)), re.IGNORECASE)
        self.longest = len(ordered[0])

    def search(self, text: str, pos: int) -> tuple[int, int] | None:
        m = self.regex.search(text, pos)
        return (m.start(), m.end()) if m else None

    def frontier(self, text: str, pos: int) -> int:
        # The longest tail that may still grow into a term (or is one whose next character,
        # which decides the whole-word check, has not arrived).
        for s in range(max(pos, len(text) - self.longest), len(text)):
            if self.prefix.fullmatch(text, s):
                return s
        return len(text)


class _Pattern:
    """A rule's regular expression, bounded by the rule's max_length."""

    kind = "pattern"

    def __init__(self, rule: Rule) -> None:
        self.regex = re.compile(rule.pattern or "")
        self.rule = rule

    def search(self, text: str, pos: int) -> tuple[int, int] | None:
        while (m := self.regex.search(text, pos)) is not None:
            if m.end() - m.start() > self.rule.max_length:
                # Streaming relies on the bound; a longer match is a mistake in the policy.
                raise TrustgenError(
                    f"policy rule {self.rule.name!r} matched {m.end() - m.start()} characters, "
                    f"more than its max_length of {self.rule.max_length}; raise max_length or "
                    f"bound the pattern.")
            if m.end() > m.start():
                return m.start(), m.end()
            pos = m.start() + 1  # an empty match (a pattern like \b) has nothing to act on
        return None

    def frontier(self, text: str, pos: int) -> int:
        return max(pos, len(text) - self.rule.max_length - MARGIN)


@dataclass(frozen=True)
class _Matcher:
    rule: Rule
    finder: _Finder
    order: int  # the last tie-breaker: earlier rules (and earlier kinds in a rule) win

    @property
    def severity(self) -> int:
        return SEVERITY[self.rule.action]

    def replacement(self) -> str:
        if self.rule.replacement is not None:
            return self.rule.replacement
        return PLACEHOLDERS.get(self.finder.kind, DEFAULT_REPLACEMENT)


@dataclass(frozen=True)
class _Hit:
    start: int
    end: int
    matcher: _Matcher

    def priority(self) -> tuple[int, int, int, int]:
        return self.start, -self.matcher.severity, self.start - self.end, self.matcher.order


# ---- results ----

@dataclass(frozen=True)
class Finding:
    """A rule that matched: the rule, its action, the kind of match and where it is (offsets
    in the original text). The matched text is left out, so findings can be logged."""

    rule: str
    action: Action
    kind: str  # "term", "pattern" or a PII kind
    start: int
    end: int


@dataclass(frozen=True)
class PolicyResult:
    """The outcome of a check: the strongest action taken, the text to show, the findings.
    When blocked, `text` is what comes before the blocked match (what a stream shows)."""

    action: Outcome
    text: str
    findings: tuple[Finding, ...]

    @property
    def blocked(self) -> bool:
        return self.action == "block"


class PolicyViolation(TrustgenError):
    """A prompt matched a block rule."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(f"the prompt is blocked by policy rule {finding.rule!r} "
                         f"({finding.kind} at characters {finding.start}-{finding.end}).")
        self.finding = finding


# ---- the policy and its streaming engine ----

class Policy:
    """An ordered list of rules, applied to prompts, outputs and streams."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        finders: list[tuple[Rule, _Finder]] = []
        for rule in self.rules:
            if rule.terms:
                finders.append((rule, _Terms(rule.terms)))
            if rule.pattern is not None:
                finders.append((rule, _Pattern(rule)))
            finders.extend((rule, DETECTORS[kind]) for kind in rule.pii)
        self._matchers = tuple(_Matcher(rule, finder, i) for i, (rule, finder) in enumerate(finders))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """A policy from a parsed TOML document: {"rule": [{...}, ...]}."""
        unknown = sorted(set(data) - {"rule"})
        if unknown:
            raise TrustgenError(f"the policy has unknown top-level key(s) {', '.join(unknown)}; "
                                f"rules go in [[rule]] tables.")
        tables = data.get("rule")
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise TrustgenError("the policy has no rules; add at least one [[rule]] table.")
        return cls([Rule.from_dict(t, i) for i, t in enumerate(tables, start=1)])

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        """A policy from a TOML file of [[rule]] tables."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TrustgenError(f"cannot read the policy file {path}: {e.strerror or e}.") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TrustgenError(f"the policy file {path} is not valid TOML: {e}.") from None
        try:
            return cls.from_dict(data)
        except TrustgenError as e:
            raise TrustgenError(f"{path}: {e}") from None

    def check(self, text: str) -> PolicyResult:
        """Apply the policy to a whole text (a prompt, or an output that was not streamed)."""
        stream = self.stream_filter()
        shown = stream.feed(text) + stream.close()
        return PolicyResult(action=stream.action, text=shown, findings=tuple(stream.findings))

    def check_prompt(self, prompt: str) -> PolicyResult:
        """Check a prompt; raise PolicyViolation if a block rule matches it. The result's text
        carries any redactions: generate from it rather than from the raw prompt."""
        result = self.check(prompt)
        if result.blocked:
            raise PolicyViolation(result.findings[-1])  # a block ends the scan: it comes last
        return result

    def stream_filter(self) -> StreamFilter:
        """A filter for text that arrives piece by piece (generated tokens)."""
        return StreamFilter(self._matchers)


class StreamFilter:
    """Applies a policy to a stream: show what `feed` returns for each piece, then what `close`
    returns. Text is released only once no later piece can make it part of a blocked or redacted
    match; redactions are applied before release; after a block nothing more is released. The
    concatenated output equals `Policy.check(whole_text).text`."""

    def __init__(self, matchers: tuple[_Matcher, ...]) -> None:
        self.matchers = matchers
        self.findings: list[Finding] = []
        self.blocked_by: Finding | None = None
        self._buffer = ""  # unreleased text, after up to LOOKBEHIND released characters
        self._pos = 0  # the index in _buffer of the first unreleased character
        self._offset = 0  # the position of _buffer[0] in the whole stream

    @property
    def blocked(self) -> bool:
        return self.blocked_by is not None

    @property
    def action(self) -> Outcome:
        """The strongest action taken so far ("allow" when nothing matched)."""
        return max((f.action for f in self.findings), key=SEVERITY.__getitem__, default="allow")

    def feed(self, piece: str) -> str:
        if self.blocked:
            return ""
        self._buffer += piece
        out = self._advance(final=False)
        drop = max(0, self._pos - LOOKBEHIND)
        self._buffer, self._pos, self._offset = self._buffer[drop:], self._pos - drop, self._offset + drop
        return out

    def close(self) -> str:
        """Release the rest: at the end of the text every match is decided."""
        if self.blocked:
            return ""
        out = self._advance(final=True)
        self._offset += len(self._buffer)
        self._buffer, self._pos = "", 0
        return out

    def _advance(self, final: bool) -> str:
        """Release what is decided; `final` means no more text will come."""
        text, out = self._buffer, []
        while True:
            hit, bound = self._first(self.matchers, self._pos, len(text), final)
            if hit is None:
                out.append(text[self._pos:bound])
                self._pos = bound
                return "".join(out)
            stronger = [m for m in self.matchers if m.severity > hit.matcher.severity]
            inner, inner_bound = self._first(stronger, hit.start + 1, hit.end, final)
            if inner is None and inner_bound < hit.end:
                # A stronger rule may yet match inside this one: wait for more text.
                out.append(text[self._pos:hit.start])
                self._pos = hit.start
                return "".join(out)
            if inner is not None and hit.matcher.rule.action == "warn":
                # Record the warning, then let the stronger match take over where it begins.
                self._record(hit)
                out.append(text[self._pos:inner.start])
                self._pos = inner.start
                continue
            out.append(text[self._pos:hit.start])
            if inner is not None:  # a redaction with a blocked match inside it
                hit = inner
            self._record(hit)
            action = hit.matcher.rule.action
            if action == "block":
                self.blocked_by = self.findings[-1]
                return "".join(out)
            out.append(hit.matcher.replacement() if action == "redact" else text[hit.start:hit.end])
            self._pos = hit.end

    def _first(self, matchers: Sequence[_Matcher], start: int, limit: int,
               final: bool) -> tuple[_Hit | None, int]:
        """The first hit starting in [start, limit), if it is decided; otherwise None and a
        bound such that no match starts in [start, bound), whatever text comes next."""
        text = self._buffer
        best: _Hit | None = None
        undecided = limit
        for matcher in matchers:
            span = matcher.finder.search(text, start)
            frontier = len(text) if final else matcher.finder.frontier(text, start)
            if span is not None and span[0] < frontier:
                hit = _Hit(span[0], span[1], matcher)
                if best is None or hit.priority() < best.priority():
                    best = hit
            else:
                undecided = min(undecided, frontier)
        if best is not None and best.start < undecided:
            return best, best.start
        return None, min(undecided, best.start if best else limit)

    def _record(self, hit: _Hit) -> None:
        rule = hit.matcher.rule
        self.findings.append(Finding(rule.name, rule.action, hit.matcher.finder.kind,
                                     self._offset + hit.start, self._offset + hit.end))
