"""The @tool decorator (schema, docstring, validation, sync/async, timeout, errors) and the calculator."""

from __future__ import annotations

import asyncio
import enum
import json
import math
import threading
from typing import Literal, Optional

import jsonschema
import pydantic
import pytest

from lmstack.agent._errors import ToolArgumentError, ToolError
from lmstack.agent.tools import CalculatorError, Tool, ToolOutput, calculator, evaluate, tool


class Unit(enum.Enum):
    KM = "km"
    MI = "mi"


class Place(pydantic.BaseModel):
    name: str
    population: int = 0


@tool
def plan_trip(
    destination: str,
    days: int,
    budget: float,
    cities: list[str],
    unit: Unit = Unit.KM,
    pace: Literal["slow", "fast"] = "slow",
    notes: Optional[str] = None,  # noqa: UP045 - the Optional spelling is what is being tested
    home: Place | None = None,
    options: dict[str, int] | None = None,
    schema: bool = False,
) -> dict[str, object]:
    """Plan a trip.

    Builds an itinerary
    for the given days.

    Args:
        destination: Where to go.
        days (int): How many days; a multi-line
            description continues here.
        budget: Money to spend.
        cities: Cities on the way.
        unit: Distance unit.

    Returns:
        The plan.
    """
    return {"destination": destination, "days": days, "unit": unit, "home": home, "schema": schema}


EXPECTED_PARAMETERS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "destination": {"type": "string", "description": "Where to go."},
        "days": {"type": "integer", "description": "How many days; a multi-line description continues here."},
        "budget": {"type": "number", "description": "Money to spend."},
        "cities": {"type": "array", "items": {"type": "string"}, "description": "Cities on the way."},
        "unit": {"$ref": "#/$defs/Unit", "default": "km", "description": "Distance unit."},
        "pace": {"enum": ["slow", "fast"], "type": "string", "default": "slow"},
        "notes": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "home": {"anyOf": [{"$ref": "#/$defs/Place"}, {"type": "null"}], "default": None},
        "options": {
            "anyOf": [{"type": "object", "additionalProperties": {"type": "integer"}}, {"type": "null"}],
            "default": None,
        },
        "schema": {"type": "boolean", "default": False},
    },
    "required": ["destination", "days", "budget", "cities"],
    "$defs": {
        "Unit": {"enum": ["km", "mi"], "type": "string"},
        "Place": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "population": {"type": "integer", "default": 0}},
            "required": ["name"],
        },
    },
}

GOOD = {"destination": "Quux", "days": 3, "budget": 99.5, "cities": ["A", "B"], "home": {"name": "Blip"}}


def test_schema_from_type_hints_and_docstring() -> None:
    assert plan_trip.name == "plan_trip"
    assert plan_trip.description == "Plan a trip. Builds an itinerary for the given days."
    assert plan_trip.parameters == EXPECTED_PARAMETERS
    jsonschema.Draft202012Validator.check_schema(plan_trip.parameters)
    assert plan_trip.spec() == {
        "type": "function",
        "function": {
            "name": "plan_trip",
            "description": plan_trip.description,
            "parameters": EXPECTED_PARAMETERS,
        },
    }


def test_validation_agrees_with_the_schema() -> None:
    # What jsonschema accepts, validate accepts (coerced to the annotated types), and the reverse.
    jsonschema.validate(GOOD, plan_trip.parameters)
    kwargs = plan_trip.validate(json.dumps(GOOD))
    assert kwargs == {
        "destination": "Quux",
        "days": 3,
        "budget": 99.5,
        "cities": ["A", "B"],
        "unit": Unit.KM,
        "pace": "slow",
        "notes": None,
        "home": Place(name="Blip", population=0),
        "options": None,
        "schema": False,
    }
    for bad in ({**GOOD, "days": "three"}, {**GOOD, "pace": "medium"}, {**GOOD, "extra": 1}, {"days": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, plan_trip.parameters)
        with pytest.raises(ToolArgumentError):
            plan_trip.validate(bad)
    # Lax coercion where the value is unambiguous: "3" is the integer 3, "mi" the enum member.
    assert plan_trip.validate({**GOOD, "days": "3", "unit": "mi"})["days"] == 3
    assert plan_trip.validate({**GOOD, "unit": "mi"})["unit"] is Unit.MI


def test_argument_errors_name_the_field_and_what_was_expected() -> None:
    with pytest.raises(ToolArgumentError) as info:
        plan_trip.validate({"destination": 5, "days": "three", "cities": "A", "colour": "red"})
    message = str(info.value)
    assert message.startswith("plan_trip: invalid arguments: ")
    assert "field 'destination': Input should be a valid string, got 5; expected a string" in message
    assert (
        "field 'days': Input should be a valid integer, unable to parse string as an integer, got \"three\""
        in message
    )
    assert "missing required field 'budget' (a number)" in message
    assert (
        "field 'cities': Input should be a valid list, got \"A\"; expected an array (items: a string)"
        in message
    )
    assert "unknown field 'colour' (the fields are: 'destination', 'days'," in message
    with pytest.raises(ToolArgumentError, match=r"invalid arguments: missing required field 'home.name'$"):
        plan_trip.validate({**GOOD, "home": {"population": 3}})
    with pytest.raises(
        ToolArgumentError, match=r"not valid JSON \(Expecting .*\); send one JSON object with the fields"
    ):
        plan_trip.validate('{"destination": "Quux",')
    with pytest.raises(
        ToolArgumentError,
        match=r"must be a JSON object .*'pace': one of \"slow\", \"fast\" \(optional\).*got list",
    ):
        plan_trip.validate("[1, 2]")


def test_no_argument_tool_accepts_empty_arguments() -> None:
    @tool(name="now-ish", description="The time.")
    def clock() -> str:
        return "noon"

    assert clock.parameters == {"type": "object", "additionalProperties": False, "properties": {}}
    for empty in ("", "  ", "{}", {}):
        assert asyncio.run(clock.acall(empty)) == ToolOutput(ok=True, content="noon", data="noon")
    assert clock.name == "now-ish" and clock.description == "The time."


def test_sync_tools_run_in_a_worker_thread_and_async_tools_on_the_loop() -> None:
    threads: dict[str, int] = {}

    @tool
    def sync_tool(x: int) -> int:
        """Double."""
        threads["sync"] = threading.get_ident()
        return 2 * x

    @tool
    async def async_tool(x: int) -> list[int]:
        """Repeat."""
        threads["async"] = threading.get_ident()
        await asyncio.sleep(0)
        return [x, x]

    async def main() -> tuple[ToolOutput, ToolOutput]:
        threads["loop"] = threading.get_ident()
        return await asyncio.gather(sync_tool.acall({"x": 4}), async_tool.acall('{"x": 4}'))

    sync_out, async_out = asyncio.run(main())
    assert sync_out == ToolOutput(ok=True, content="8", data=8)
    assert async_out == ToolOutput(ok=True, content="[4, 4]", data=[4, 4])
    assert threads["sync"] != threads["loop"] and threads["async"] == threads["loop"]
    # The plain function stays callable as it is.
    assert sync_tool(5) == 10
    assert asyncio.run(async_tool(1)) == [1, 1]


def test_failures_become_results_not_exceptions() -> None:
    release = threading.Event()

    @tool(timeout_s=0.05)
    async def hangs() -> str:
        """Never answers."""
        await asyncio.Event().wait()
        return "never"

    @tool(timeout_s=0.05)
    def blocks() -> str:
        """Blocks its thread until released."""
        release.wait(30)
        return "late"

    @tool
    def boom(x: int) -> int:
        """Fails."""
        raise ValueError(f"bad x {x}")

    async def overrun() -> tuple[ToolOutput, ToolOutput]:
        try:
            return await hangs.acall({}), await blocks.acall({})
        finally:
            release.set()  # the blocked worker thread ends, so the loop can close

    assert asyncio.run(overrun()) == (
        ToolOutput(ok=False, content="hangs timed out after 0.05 s"),
        ToolOutput(ok=False, content="blocks timed out after 0.05 s"),
    )
    assert asyncio.run(boom.acall({"x": 3})) == ToolOutput(
        ok=False, content="boom failed: ValueError: bad x 3"
    )
    wrong = asyncio.run(boom.acall({"x": "three"}))
    assert not wrong.ok and wrong.content.startswith("boom: invalid arguments: field 'x'")


def test_results_that_are_not_text_are_json() -> None:
    out = asyncio.run(plan_trip.acall(GOOD))
    assert out.ok
    assert json.loads(out.content) == {
        "destination": "Quux",
        "days": 3,
        "unit": "km",
        "home": {"name": "Blip", "population": 0},
        "schema": False,
    }
    assert out.data["home"] == Place(name="Blip")


def test_functions_that_cannot_be_tools_are_refused() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    def star(*args: int) -> int:
        return 0

    def ok(x: int) -> int:
        return x

    with pytest.raises(ToolError, match="parameter 'x' has no type hint"):
        tool(untyped)
    with pytest.raises(ToolError, match=r"\*args"):
        tool(star)
    with pytest.raises(ToolError, match="tool name 'two words' is not allowed"):
        tool(name="two words")(ok)
    with pytest.raises(ToolError, match="timeout_s must be positive"):
        Tool(ok, timeout_s=0)


# --- calculator ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 100", 1267650600228229401496703205376),
        ("-7 // 2", -4),
        ("-7 % 3", 2),
        ("7 / 2", 3.5),
        ("0.1 + 0.2", 0.3),
        ("2 ** -2", 0.25),
        ("-(3 - 5)", 2),
        ("sqrt(2) * 3", float(f"{math.sqrt(2) * 3:.15g}")),
        ("log(e ** 2)", 2.0),
        ("log(8, 2)", 3.0),
        ("sin(pi / 2) + cos(0)", 2.0),
        ("exp(1)", float(f"{math.e:.15g}")),
        ("abs(-4.5) + round(2.567, 2)", 7.07),
        ("max(1, 9, 3) - min(4, 2)", 7),
        ("3 \u00d7 4 \u00f7 2 \u2212 1", 5.0),
    ],
)
def test_calculator_values(expression: str, expected: float) -> None:
    assert evaluate(expression) == expected
    assert type(evaluate(expression)) is type(expected)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('echo hi')", r"unknown function \"__import__\('os'\).system\""),
        ("__import__('os')", "unknown function '__import__'"),
        ("().__class__.__bases__", "Attribute is not allowed"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("x + 1", "unknown name 'x'"),
        ("[1, 2]", "List is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("'a' * 3", "'a' is not a number"),
        ("True + 1", "True is not a number"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("2 ^ 3", r"the operator \^ is not supported \(use \*\* for powers\)"),
        ("1 / 0", "division by zero"),
        ("sqrt(-1)", r"sqrt\(-1\): math domain error"),
        ("(-8) ** (1 / 3)", "no real result"),
        ("10 ** 10 ** 10", "too large"),
        ("9 ** 9 ** 9", "too large"),
        ("2 ** 5000 * 2 ** 5001", "too large"),
        ("exp(1000)", "overflowed"),
        ("10.0 ** 400", "overflowed"),
        ("round(1.5, 0.5)", "whole number of digits"),
        ("sqrt(x=4)", "positional arguments only"),
        ("1 +", "not a valid expression"),
        ("1" + "+1" * 600, "too long"),
        ("(" * 300 + "1" + ")" * 300, "not a valid expression: too many nested parentheses"),
    ],
)
def test_calculator_refuses_with_a_clear_message(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)


def test_calculator_tool() -> None:
    assert calculator.spec()["function"]["parameters"]["required"] == ["expression"]
    assert asyncio.run(calculator.acall({"expression": "6 * 7"})) == ToolOutput(
        ok=True, content="42", data=42
    )
    bad = asyncio.run(calculator.acall('{"expression": "1/0"}'))
    assert bad == ToolOutput(ok=False, content="calculator failed: CalculatorError: division by zero")
    assert calculator("2 ** 10") == 1024
