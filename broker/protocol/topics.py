"""Topic names, topic filters, shared-subscription syntax and the exact MQTT matching rule.

Why: every place that accepts a topic (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, will, mesh receivers)
must agree on one definition of "valid" and one definition of "matches". The trees in
`broker.routing` are the fast path; `topic_matches` here is the reference they are tested against.

Must not: do IO, read the clock, normalise strings [MQTT-4.7.3-4], or know about sessions, ACLs
or protocol versions (a caller that does not offer shared subscriptions to 3.1.1 clients decides
that itself).

Invariants:
- Levels are the substrings between '/' separators; empty levels are real levels ("a//b" has
  three, "/a" has two, the first empty).
- Matching functions (`topic_matches`) take a plain filter (the ZeroMQ prefix of a filter,
  `literal_prefix`, lives in `mesh/routes.py`, shared by the workers and the relay). For a shared
  subscription the caller passes the filter part from `parse_shared`; a `$share/...` string given
  to them is treated as a literal filter.
- Filters that start with a wildcard never match topic names that start with '$'
  [MQTT-4.7.2-1].
"""

from __future__ import annotations

from broker.protocol.errors import MQTTError
from broker.protocol.reasons import Reason

MAX_TOPIC_BYTES = 65535
SHARE_PREFIX = "$share/"


class TopicError(MQTTError):
    """A topic name (0x90) or topic filter (0x8F) that breaks the rules of spec section 4.7."""

    reason_code = Reason.TOPIC_NAME_INVALID


def _check_string(text: str, reason: Reason, what: str) -> None:
    """The rules common to names and filters: non-empty, no U+0000, well-formed, <= 65535 bytes."""
    if not text:
        raise TopicError(f"{what} is empty [MQTT-4.7.3-1]", reason)
    if "\x00" in text:
        raise TopicError(f"{what} contains U+0000 [MQTT-4.7.3-2]", reason)
    # A str can hold lone surrogates that have no UTF-8 encoding [MQTT-1.5.4-1]; encoding also
    # gives the exact byte length. ASCII text (the common case) is one byte per character, so it
    # skips the encode.
    if len(text) > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} is longer than {MAX_TOPIC_BYTES} bytes [MQTT-4.7.3-3]", reason)
    if text.isascii():
        return
    try:
        size_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise TopicError(f"{what} is not well-formed UTF-8 [MQTT-1.5.4-1]", reason) from None
    if size_bytes > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} is longer than {MAX_TOPIC_BYTES} bytes [MQTT-4.7.3-3]", reason)


def validate_topic_name(topic: str) -> None:
    """Raise TopicError (0x90) unless `topic` may be the topic name of a PUBLISH or a will."""
    _check_string(topic, Reason.TOPIC_NAME_INVALID, "topic name")
    if "+" in topic or "#" in topic:
        raise TopicError(
            f"topic name {topic!r} contains a wildcard [MQTT-3.3.2-2] [MQTT-4.7.1-1]",
            Reason.TOPIC_NAME_INVALID,
        )


def _check_wildcards(topic_filter: str, whole: str) -> None:
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise TopicError(
                f"topic filter {whole!r}: '#' must be a whole last level [MQTT-4.7.1-2]",
                Reason.TOPIC_FILTER_INVALID,
            )
        if "+" in level and level != "+":
            raise TopicError(
                f"topic filter {whole!r}: '+' must be a whole level [MQTT-4.7.1-3]",
                Reason.TOPIC_FILTER_INVALID,
            )


def validate_topic_filter(topic_filter: str) -> None:
    """Raise TopicError (0x8F) unless `topic_filter` may appear in SUBSCRIBE or UNSUBSCRIBE.

    A filter starting with "$share/" is a shared subscription: "$share/{ShareName}/{filter}".
    """
    _check_string(topic_filter, Reason.TOPIC_FILTER_INVALID, "topic filter")
    if not topic_filter.startswith(SHARE_PREFIX):
        _check_wildcards(topic_filter, topic_filter)
        return
    slash = topic_filter.find("/", len(SHARE_PREFIX))
    end = len(topic_filter) if slash < 0 else slash
    share_name = topic_filter[len(SHARE_PREFIX) : end]
    if not share_name:
        raise TopicError(
            f"shared filter {topic_filter!r} has an empty ShareName [MQTT-4.8.2-1]",
            Reason.TOPIC_FILTER_INVALID,
        )
    if "+" in share_name or "#" in share_name:
        raise TopicError(
            f"shared filter {topic_filter!r}: ShareName contains '+' or '#' [MQTT-4.8.2-2]",
            Reason.TOPIC_FILTER_INVALID,
        )
    if slash < 0 or slash == len(topic_filter) - 1:
        raise TopicError(
            f"shared filter {topic_filter!r}: ShareName must be followed by '/' and a topic "
            "filter [MQTT-4.8.2-2]",
            Reason.TOPIC_FILTER_INVALID,
        )
    _check_wildcards(topic_filter[slash + 1 :], topic_filter)


def parse_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split a validated filter: "$share/g/a/b" -> ("g", "a/b"); "a/b" -> (None, "a/b")."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    slash = topic_filter.index("/", len(SHARE_PREFIX))
    return topic_filter[len(SHARE_PREFIX) : slash], topic_filter[slash + 1 :]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if the plain (non-shared) `topic_filter` matches the topic name `topic`.

    Exact rule of spec 4.7: '+' is exactly one level (possibly empty), '#' is zero or more
    trailing levels including the parent ("a/#" matches "a") [MQTT-4.7.1-2], and a filter
    starting with a wildcard does not match a topic starting with '$' [MQTT-4.7.2-1].
    """
    if topic[:1] == "$" and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    topic_depth = len(topic_levels)
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= topic_depth:
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == topic_depth
