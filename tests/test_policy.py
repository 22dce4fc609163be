"""Content policy and PII: each detector with its near misses, rule loading and its errors,
block/redact/warn, and streaming that never shows text a later piece turns into a match."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustgen.errors import TrustgenError
from trustgen.safety.policy import (
    ALL_KINDS,
    Policy,
    PolicyViolation,
    Rule,
    find_pii,
    scrub_pii,
)


def kinds_in(text: str) -> list[tuple[str, str]]:
    return [(m.kind, m.text) for m in find_pii(text)]


# ---- PII detectors ----

@pytest.mark.parametrize(("kind", "found", "misses"), [
    ("email", ["bob@example.com", "first.last+tag@mail.example.co.uk", "o'neil@x.org"],
     ["bob@localhost", "bob@example", "bob@example.c", "bob@example..com", "bob@-example.com", "@example.com"]),
    ("phone", ["+1 415 555 2671", "+44 20 7946 0958", "+4915112345678", "(415) 555-2671",
               "415-555-2671", "415.555.2671", "020 7946 0958", "555-2671"],
     ["1999-2004", "2024-01-15", "12345678", "415-555-26711", "+12 34", "3-2", "v1.2.3"]),
    ("card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "5555555555554444", "378282246310005"],
     ["4111 1111 1111 1112", "4111111111111112", "41111111111111111111", "12345"]),
    ("ipv4", ["192.168.0.1", "8.8.8.8", "255.255.255.255"],
     ["999.1.1.1", "256.1.1.1", "1.2.3", "1.2.3.4.5", "01.2.3.4"]),
    ("ipv6", ["2001:db8::1", "::1", "fe80::1ff:fe23:4567:890a", "::ffff:192.0.2.1",
              "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
     ["12:30:45", "00:1A:2B:3C:4D:5E", "std::vector", "::", "1:2:3:4:5:6:7:8:9"]),
    ("iban", ["GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765432", "DE89 3704 0044 0532 0130 00",
              "NL91ABNA0417164300", "FR14 2004 1010 0505 0001 3M02 606"],
     ["GB83 WEST 1234 5698 7654 32", "DE88370400440532013000", "GB82WEST1234569876543", "XX00"]),
])
def test_each_kind_and_its_near_misses(kind: str, found: list[str], misses: list[str]) -> None:
    for value in found:
        assert kinds_in(f"see {value}. ok") == [(kind, value)], value
    for value in misses:
        assert kind not in {k for k, _ in kinds_in(f"see {value}. ok")}, value


def test_ordinary_text_has_no_pii() -> None:
    text = ("In 1999-2004 the plant made 12345678 units at 3.5 per cent; see pages 10-12, "
            "version 2.0.1, 10:30 on 2024-01-15, room 101 and a 16-digit id 1234567812345678.")
    assert find_pii(text) == []


def test_matches_are_spans_of_the_text_and_kinds_can_be_chosen() -> None:
    text = "mail bob@example.com from 10.0.0.1"
    matches = find_pii(text)
    assert [(m.kind, text[m.start:m.end]) for m in matches] == [("email", "bob@example.com"), ("ipv4", "10.0.0.1")]
    assert [m.kind for m in find_pii(text, kinds=["ipv4"])] == ["ipv4"]
    assert [m.kind for m in find_pii(text, kinds="email")] == ["email"]
    with pytest.raises(TrustgenError, match="unknown PII kind"):
        find_pii(text, kinds=["passport"])


def test_an_iban_printed_before_more_groups_is_cut_at_its_length() -> None:
    # ES IBANs have 24 characters, six full groups; the following group is not part of it.
    assert kinds_in("ES91 2100 0418 4502 0005 1332 1234 paid") == [("iban", "ES91 2100 0418 4502 0005 1332")]


def test_scrub_replaces_with_placeholders_and_counts_by_kind() -> None:
    text = ("Write to ann@example.org or bob@example.com, call +44 20 7946 0958, pay with "
            "4111 1111 1111 1111 to GB82 WEST 1234 5698 7654 32 from 10.1.2.3 or 2001:db8::7.")
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == ("Write to [EMAIL] or [EMAIL], call [PHONE], pay with [CARD] to [IBAN] "
                        "from [IP] or [IP].")
    assert counts == {"email": 2, "phone": 1, "card": 1, "iban": 1, "ipv4": 1, "ipv6": 1}
    assert set(counts) <= set(ALL_KINDS)
    assert scrub_pii(text, kinds=["card"])[1] == {"card": 1}
    assert scrub_pii("nothing here") == ("nothing here", {})


# ---- loading a policy ----

POLICY_TOML = r"""
[[rule]]
name = "no-violence"
terms = ["kill", "stab"]
action = "block"

[[rule]]
pattern = "secret-\\d{1,8}"
max_length = 15
action = "redact"
replacement = "[SECRET]"

[[rule]]
name = "contact"
pii = ["email", "card"]
action = "redact"

[[rule]]
name = "mild"
terms = ["darn"]
action = "warn"
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML, encoding="utf-8")
    return Policy.from_toml(path)


def test_toml_loads_rules_in_order(policy: Policy) -> None:
    assert [r.name for r in policy.rules] == ["no-violence", "#2", "contact", "mild"]
    assert policy.rules[1].max_length == 15
    assert Policy.from_dict({"rule": [{"pii": "all", "action": "redact"}]}).rules[0].pii == ALL_KINDS


@pytest.mark.parametrize(("rule", "message"), [
    ({"terms": ["x"], "action": "ban"}, r"policy rule '#1' has action 'ban'"),
    ({"terms": ["x"]}, r"policy rule '#1' has no action"),
    ({"name": "r", "action": "warn"}, r"policy rule 'r' has nothing to match"),
    ({"name": "r", "pattern": "a(", "action": "warn"}, r"policy rule 'r' has an invalid pattern"),
    ({"name": "r", "pattern": "a*", "action": "warn"}, r"policy rule 'r' has a pattern that matches empty"),
    ({"name": "r", "pii": ["passport"], "action": "warn"}, r"policy rule 'r' has unknown PII kind\(s\) 'passport'"),
    ({"name": "r", "terms": ["x"], "action": "warn", "colour": 1}, r"policy rule 'r' has unknown field\(s\) colour"),
    ({"name": "r", "terms": "x", "action": "warn"}, r"policy rule 'r' has terms that is not a list"),
    ({"name": "r", "terms": [""], "action": "warn"}, r"policy rule 'r' has an empty or non-text entry in terms"),
    ({"name": "r", "terms": ["x"], "action": "warn", "replacement": "-"}, r"policy rule 'r' sets replacement"),
    ({"name": "r", "terms": ["x"], "action": "warn", "max_length": 9}, r"policy rule 'r' sets max_length"),
    ({"name": "r", "pattern": "x", "action": "warn", "max_length": "9"}, r"policy rule 'r' has max_length '9'"),
    ({"name": "r", "pattern": "x", "action": "warn", "max_length": 0}, r"policy rule 'r' has max_length 0"),
])
def test_bad_rules_name_the_rule_and_the_field(rule: dict, message: str) -> None:
    with pytest.raises(TrustgenError, match=message):
        Policy.from_dict({"rule": [rule]})


def test_bad_policy_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match=r"cannot read the policy file .*missing\.toml"):
        Policy.from_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[rule]\nterms = [", encoding="utf-8")
    with pytest.raises(TrustgenError, match=r"the policy file .*broken\.toml is not valid TOML"):
        Policy.from_toml(broken)
    empty = tmp_path / "empty.toml"
    empty.write_text("title = 'x'\n", encoding="utf-8")
    with pytest.raises(TrustgenError, match=r"empty\.toml: the policy has unknown top-level key\(s\) title"):
        Policy.from_toml(empty)
    with pytest.raises(TrustgenError, match="the policy has no rules"):
        Policy.from_dict({})


# ---- block, redact, warn ----

def test_allow_warn_redact_block(policy: Policy) -> None:
    assert policy.check("a quiet day").action == "allow"

    warned = policy.check("darn, it rained")
    assert (warned.action, warned.text) == ("warn", "darn, it rained")
    assert [(f.rule, f.kind, f.start, f.end) for f in warned.findings] == [("mild", "term", 0, 4)]

    redacted = policy.check("Darn: secret-123 goes to bob@example.com")
    assert redacted.action == "redact"
    assert redacted.text == "Darn: [SECRET] goes to [EMAIL]"
    assert [f.action for f in redacted.findings] == ["warn", "redact", "redact"]

    blocked = policy.check("mail bob@example.com, then KILL it")
    assert blocked.blocked and blocked.action == "block"
    assert blocked.text == "mail [EMAIL], then "
    assert blocked.findings[-1].rule == "no-violence"


def test_terms_are_whole_words_and_case_insensitive(policy: Policy) -> None:
    assert not policy.check("skills and killers; stabilise").blocked
    assert policy.check("Stab.").blocked


def test_a_stronger_match_inside_a_weaker_one_wins() -> None:
    rules = Policy([Rule(name="mention", pattern=r"contact: \S{1,40}", action="warn"),
                    Rule(name="pii", pii=["email"], action="redact"),
                    Rule(name="bad", terms=["kill"], action="block")])
    result = rules.check("contact: bob@example.com")
    assert result.text == "contact: [EMAIL]"
    assert [f.rule for f in result.findings] == ["mention", "pii"]
    # A blocked word inside an e-mail address is not hidden by the redaction.
    assert rules.check("write to kill@example.com").blocked
    assert rules.check("write to joe.kill@example.com").text == "write to "


def test_a_pattern_longer_than_its_max_length_is_an_error() -> None:
    policy = Policy([Rule(name="ids", pattern=r"id-\d+", max_length=8, action="redact")])
    assert policy.check("id-123 ok").text == "[REDACTED] ok"
    with pytest.raises(TrustgenError, match=r"policy rule 'ids' matched 13 characters, more than its max_length of 8"):
        policy.check("id-1234567890")


def test_prompts_are_checked_without_echoing_the_match(policy: Policy) -> None:
    assert policy.check_prompt("Tell me about bob@example.com").text == "Tell me about [EMAIL]"
    with pytest.raises(PolicyViolation) as caught:
        policy.check_prompt("how do I stab a melon")
    assert isinstance(caught.value, TrustgenError)
    assert "no-violence" in str(caught.value) and "stab" not in str(caught.value)
    assert caught.value.finding.start == 9


# ---- streaming ----

def stream(policy: Policy, pieces: list[str]) -> tuple[list[str], object]:
    filt = policy.stream_filter()
    outputs = [filt.feed(p) for p in pieces]
    outputs.append(filt.close())
    return outputs, filt


def test_a_blocked_term_split_across_pieces_is_never_partly_emitted() -> None:
    policy = Policy([Rule(name="no-violence", terms=["kill", "stab"], action="block"),
                     Rule(name="pii", pii=["card"], action="redact")])
    filt = policy.stream_filter()
    assert filt.feed("I will ki") == "I will "
    assert filt.feed("l") == ""
    assert filt.feed("l") == ""  # "kill" could still become "killer"
    assert filt.feed(" you") == ""
    assert filt.blocked and filt.blocked_by is not None and filt.blocked_by.rule == "no-violence"
    assert filt.feed("more text") == "" and filt.close() == ""
    # The same word going on into a longer one is released.
    outputs, _ = stream(policy, ["I will ki", "ll", "er whales"])
    assert "".join(outputs) == "I will killer whales"


def test_a_card_fed_digit_by_digit_is_redacted_and_never_leaks(policy: Policy) -> None:
    text = "pay 4111 1111 1111 1111 now"
    outputs, filt = stream(policy, list(text))
    assert "".join(outputs) == "pay [CARD] now"
    assert not any(c.isdigit() for c in "".join(outputs))
    assert [(f.kind, f.start, f.end) for f in filt.findings] == [("card", 4, 23)]


def test_streaming_holds_back_only_what_could_still_match() -> None:
    terms = Policy([Rule(name="bad", terms=["kill"], action="block")]).stream_filter()
    assert terms.feed("The weather is ") == "The weather is "
    assert terms.feed("fine") == "fine"  # not a prefix of "kill"
    assert terms.feed(" k") == " "
    # E-mail detection holds back the current word; a pattern holds back its max_length.
    pii = Policy([Rule(name="pii", pii=["email"], action="redact")]).stream_filter()
    assert pii.feed("write to bob") == "write to "
    assert pii.feed("@example.com today") == "[EMAIL] "
    pattern = Policy([Rule(name="ids", pattern=r"id-\d{1,4}", max_length=7, action="redact")]).stream_filter()
    assert pattern.feed("0123456789abc") == "0123"
    assert pattern.close() == "456789abc"


FRAGMENTS = ["kill", "Kill", "skill", "killer", "darn", "secret-", "42", "7", " ", " ", ".", "-",
             "\n", "hello", "bob", "@", "example", ".com", "bob@example.com", "4111 1111 1111 1111",
             "4111", "1111", "+44 20 7946 0958", "192.168.0.1", "::1", "GB82 WEST 1234 5698 7654 32",
             "contact: ", "x"]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=25).map("".join)

MIXED = Policy([Rule(name="warn", terms=["darn", "hello bob"], action="warn"),
                Rule(name="mention", pattern=r"contact: \S{1,30}", max_length=39, action="warn"),
                Rule(name="secret", pattern=r"secret-\d{1,6}", max_length=13, action="redact"),
                Rule(name="pii", pii=["all"], action="redact")])
BLOCKING = Policy([Rule(name="bad", terms=["kill"], action="block"),
                   Rule(name="pii", pii=["email", "card"], action="redact"),
                   Rule(name="bob", pattern="bob", max_length=3, action="warn")])
BLOCK_ONLY = Policy([Rule(name="bad", terms=["kill", "skill set"], action="block")])


@st.composite
def split(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=150, deadline=None)
@given(split())
def test_streaming_equals_checking_the_whole_text(case: tuple[str, list[str]]) -> None:
    text, pieces = case
    for policy in (MIXED, BLOCKING, BLOCK_ONLY):
        outputs, filt = stream(policy, pieces)
        whole = policy.check(text)
        assert "".join(outputs) == whole.text
        assert filt.action == whole.action
        assert tuple(filt.findings) == whole.findings
    # A block rule wins wherever it matches, and nothing from the blocked word on is shown.
    term = re.search(r"(?<!\w)kill(?!\w)", text, re.IGNORECASE)
    assert BLOCKING.check(text).blocked == (term is not None)
    blocked = BLOCK_ONLY.check(text)
    if blocked.blocked:
        assert blocked.text == text[:blocked.findings[-1].start]
    else:
        assert blocked.text == text
