"""Topic name / filter rules (spec 4.7, 4.8.2) and the reference matcher."""

from __future__ import annotations

import pytest

from broker.protocol.errors import MQTTError
from broker.protocol.reasons import Reason
from broker.protocol.topics import (
    MAX_TOPIC_BYTES,
    TopicError,
    parse_shared,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)
from mesh.routes import literal_prefix

# --- topic names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["a", "/", "//", "a/b", "/finance", "a/", "a//b", "$SYS/x", "sport/tennis", "ü/日本/🙂", " "],
)
def test_valid_topic_names(topic: str) -> None:
    validate_topic_name(topic)


def _name_error(topic: str) -> TopicError:
    with pytest.raises(TopicError) as caught:
        validate_topic_name(topic)
    assert caught.value.reason_code == Reason.TOPIC_NAME_INVALID
    assert isinstance(caught.value, MQTTError)
    return caught.value


def test_topic_name_empty_mqtt_4_7_3_1() -> None:
    """[MQTT-4.7.3-1] topic names are at least one character long."""
    assert "4.7.3-1" in str(_name_error(""))


@pytest.mark.parametrize("topic", ["a/+", "+", "a/#", "#", "a+b", "a#", "sport/+/player1"])
def test_topic_name_no_wildcards_mqtt_3_3_2_2(topic: str) -> None:
    """[MQTT-3.3.2-2] [MQTT-4.7.1-1] a topic name contains no wildcard characters."""
    assert "3.3.2-2" in str(_name_error(topic))


def test_topic_name_no_null_mqtt_4_7_3_2() -> None:
    """[MQTT-4.7.3-2] no U+0000."""
    assert "4.7.3-2" in str(_name_error("a/\x00/b"))


def test_topic_name_length_in_utf8_bytes_mqtt_4_7_3_3() -> None:
    """[MQTT-4.7.3-3] at most 65535 bytes once UTF-8 encoded, counted in bytes, not characters."""
    validate_topic_name("a" * MAX_TOPIC_BYTES)
    assert "4.7.3-3" in str(_name_error("a" * (MAX_TOPIC_BYTES + 1)))
    three_byte = "€"  # U+20AC encodes to 3 bytes
    validate_topic_name(three_byte * (MAX_TOPIC_BYTES // 3))
    assert "4.7.3-3" in str(_name_error(three_byte * (MAX_TOPIC_BYTES // 3) + "ab"))


def test_topic_name_lone_surrogate_mqtt_1_5_4_1() -> None:
    """[MQTT-1.5.4-1] U+D800..U+DFFF cannot be in a UTF-8 string."""
    assert "1.5.4-1" in str(_name_error("a/\ud800"))


def test_topic_name_unicode_is_not_normalised_mqtt_4_7_3_4() -> None:
    """[MQTT-4.7.3-4] "é" precomposed and decomposed are different topics."""
    precomposed, decomposed = "caf\u00e9", "cafe\u0301"
    validate_topic_name(precomposed)
    validate_topic_name(decomposed)
    assert not topic_matches(precomposed, decomposed)
    assert topic_matches("+", decomposed)


# --- topic filters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+",
        "/",
        "a/#",
        "+/+",
        "/+",
        "+/",
        "a//b",
        "sport/tennis/#",
        "sport/+/player1",
        "+/tennis/#",
        "$SYS/#",
        "a/+/+/#",
        "日本/+",
        "$share/g/a/b",
        "$share/g/#",
        "$share/g/+/x",
        "$share/g//",
        "$share/日本/a",
        "$share",
        "$sharex/a",
    ],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


def _filter_error(topic_filter: str) -> TopicError:
    with pytest.raises(TopicError) as caught:
        validate_topic_filter(topic_filter)
    assert caught.value.reason_code == Reason.TOPIC_FILTER_INVALID
    return caught.value


def test_topic_filter_empty_mqtt_4_7_3_1() -> None:
    """[MQTT-4.7.3-1]"""
    assert "4.7.3-1" in str(_filter_error(""))


def test_topic_filter_no_null_mqtt_4_7_3_2() -> None:
    """[MQTT-4.7.3-2]"""
    assert "4.7.3-2" in str(_filter_error("a/\x00"))


def test_topic_filter_length_mqtt_4_7_3_3() -> None:
    """[MQTT-4.7.3-3]"""
    validate_topic_filter("a" * MAX_TOPIC_BYTES)
    assert "4.7.3-3" in str(_filter_error("a" * (MAX_TOPIC_BYTES - 1) + "/#"))
    assert "4.7.3-3" in str(_filter_error("日" * (MAX_TOPIC_BYTES // 3 + 1)))


@pytest.mark.parametrize("topic_filter", ["a/#/b", "#/", "a#", "a/b#", "#a", "##", "a/#/#"])
def test_multi_level_wildcard_whole_last_level_mqtt_4_7_1_2(topic_filter: str) -> None:
    """[MQTT-4.7.1-2] '#' stands alone or after '/', and is the last character."""
    assert "4.7.1-2" in str(_filter_error(topic_filter))


@pytest.mark.parametrize("topic_filter", ["a+", "a/b+", "+a/b", "a/+b/c", "++", "sport+"])
def test_single_level_wildcard_whole_level_mqtt_4_7_1_3(topic_filter: str) -> None:
    """[MQTT-4.7.1-3] '+' occupies an entire level."""
    assert "4.7.1-3" in str(_filter_error(topic_filter))


@pytest.mark.parametrize("topic_filter", ["$share//a", "$share/"])
def test_shared_name_non_empty_mqtt_4_8_2_1(topic_filter: str) -> None:
    """[MQTT-4.8.2-1] a ShareName is at least one character long."""
    assert "4.8.2-1" in str(_filter_error(topic_filter))


@pytest.mark.parametrize(
    "topic_filter",
    ["$share/g+/a", "$share/#/a", "$share/+/a", "$share/g", "$share/g/", "$share/g#"],
)
def test_shared_name_chars_and_filter_mqtt_4_8_2_2(topic_filter: str) -> None:
    """[MQTT-4.8.2-2] no '/', '+', '#' in ShareName; then '/' and a non-empty Topic Filter."""
    assert "4.8.2-2" in str(_filter_error(topic_filter))


@pytest.mark.parametrize("topic_filter", ["$share/g/a/#/b", "$share/g/a+"])
def test_shared_filter_part_follows_filter_rules(topic_filter: str) -> None:
    """[MQTT-4.8.2-2] the part after the ShareName is a valid Topic Filter."""
    _filter_error(topic_filter)


def test_parse_shared() -> None:
    assert parse_shared("$share/g/a/b") == ("g", "a/b")
    assert parse_shared("$share/g/#") == ("g", "#")
    assert parse_shared("$share/g//") == ("g", "/")
    assert parse_shared("a/b") == (None, "a/b")
    assert parse_shared("$SYS/#") == (None, "$SYS/#")
    assert parse_shared("$share") == (None, "$share")


# --- matching ----------------------------------------------------------------------------------

MATCHES = [
    # [MQTT-4.7.1-2] non-normative examples of '#'
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("sport/tennis/#", "sport/tennis", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    # [MQTT-4.7.1-3] non-normative examples of '+'
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/x", True),
    ("+", "a", True),
    ("+/+", "a", False),
    ("a/+", "a/", True),
    ("a/+/b", "a//b", True),
    ("a//b", "a//b", True),
    ("a//b", "a/b", False),
    ("/a", "a", False),
    ("a/", "a", False),
    ("a", "a/", False),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("Accounts", "accounts", False),
    ("a/b", "a/b", True),
    ("a/#", "ab", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHES)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("#", "$SYS/broker/clients", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("+", "$SYS", False),
        ("+/#", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker/clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("$SYS/#", "$SYS", True),
        ("a/#", "a/$b", True),
        ("a/+", "a/$b", True),
        ("#", "x/$SYS", True),
    ],
)
def test_dollar_topics_mqtt_4_7_2_1(topic_filter: str, topic: str, expected: bool) -> None:
    """[MQTT-4.7.2-1] filters starting with '#' or '+' do not match topics starting with '$'."""
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "prefix"),
    [
        ("a/b/+/c", "a/b/"),
        ("#", ""),
        ("+", ""),
        ("+/a", ""),
        ("a/b", "a/b"),
        ("a/#", "a"),
        ("/#", ""),
        ("a/+", "a/"),
        ("a/+/#", "a/"),
        ("$SYS/#", "$SYS"),
        ("a//b/#", "a//b"),
    ],
)
def test_literal_prefix(topic_filter: str, prefix: str) -> None:
    assert literal_prefix(topic_filter) == prefix


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHES)
def test_literal_prefix_is_a_prefix_of_every_matched_topic(
    topic_filter: str, topic: str, expected: bool
) -> None:
    """A ZeroMQ subscription to the prefix must never lose a topic the filter matches."""
    if expected:
        assert topic.startswith(literal_prefix(topic_filter))
