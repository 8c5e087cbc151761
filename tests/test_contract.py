"""The contract as files: the checked-in JSON Schemas are what the generator writes, every sample event
validates (raw body against its envelope, routed value against its topic), hostile bodies do not."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from sentpipe.schemas import contract
from sentpipe.schemas.events import MAX_ID_LENGTH, ROUTED_TYPES, EventType, frame
from sentpipe.schemas.routing import H_RECEIVED_AT, H_TENANT, route
from sentpipe.schemas.samples import SampleFactory
from sentpipe.schemas.topics import Topics
from tests.hostile import HOSTILE, Hostile

ROOT = Path(__file__).resolve().parent.parent
T = Topics("sent.")


def validator(name: str) -> jsonschema.protocols.Validator:
    schema = contract.load(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


VALIDATORS = {name: validator(name) for name in contract.SCHEMAS}


def _route(body: bytes) -> Any:
    return route(
        None,
        body,
        {H_TENANT: b"acme", H_RECEIVED_AT: b"1767225600000"},
        topics=T,
        id_source="auto",
        default_tenant="default",
        record_timestamp_ms=1,
    )


def _envelope(body: bytes) -> str:
    return contract.ENVELOPE_SCHEMAS[frame(body, webhook_id=None).shape]


def test_checked_in_files_are_what_the_generator_writes() -> None:
    assert contract.stale() == []
    for name in contract.SCHEMAS:
        assert contract.path_of(name).read_text() == contract.render(name), name
        assert contract.load(name) == orjson.loads(contract.render(name))  # shipped as package data
    assert sorted(p.name for p in contract.JSON_DIR.glob("*.json")) == sorted(
        f"{n}.schema.json" for n in contract.SCHEMAS
    )
    assert set(contract.TOPIC_SCHEMAS.values()) | set(contract.ENVELOPE_SCHEMAS.values()) == set(
        contract.SCHEMAS
    )


def test_check_names_the_stale_file_in_one_line_and_write_repairs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "json"
    shutil.copytree(contract.JSON_DIR, copy)
    monkeypatch.setattr(contract, "JSON_DIR", copy)
    assert contract.main(["--check"]) == 0
    stale = copy / "message.status.updated.schema.json"
    stale.write_text(stale.read_text().replace("256", "255"))
    assert contract.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "message.status.updated.schema.json" in err
    assert "sent.envelope" not in err
    (copy / "guide.envelope.schema.json").unlink()
    assert contract.main(["--check"]) == 1
    assert "guide.envelope.schema.json" in capsys.readouterr().err
    assert contract.main(["--write"]) == 0
    assert contract.main(["--check"]) == 0


def test_the_module_runs_as_a_command() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "sentpipe.schemas.contract", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert (res.returncode, res.stderr) == (0, "")


def test_the_json_files_are_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "json/*.json" in config["tool"]["setuptools"]["package-data"]["sentpipe.schemas"]


def test_the_schemas_carry_the_models_limits() -> None:
    text = contract.render("message.status.updated")
    assert f'"maxLength": {MAX_ID_LENGTH}' in text
    status = VALIDATORS["message.status.updated"].schema
    assert status["properties"]["type"]["const"] == "message.status.updated"
    assert set(status["required"]) >= {"id", "type", "tenant", "occurred_at", "received_at", "data", "status"}


@pytest.mark.parametrize("shape", ["sent", "guide"])
def test_every_sample_validates_raw_and_routed(shape: str) -> None:
    f = SampleFactory(5)
    samples = f.mix(300, shape)  # type: ignore[arg-type]
    samples += [f.message_status("m", s, shape) for s in ("queued", "failed", "read")]  # type: ignore[arg-type]
    assert {s.type for s in samples} == set(ROUTED_TYPES)
    for sample in samples:
        errors = list(VALIDATORS[_envelope(sample.body)].iter_errors(orjson.loads(sample.body)))
        assert not errors, (sample.body, errors[0].message)
        routed = _route(sample.body)
        assert routed.event is not None and routed.event.type is sample.type
        topic_schema = contract.TOPIC_SCHEMAS[routed.event.type]
        value = orjson.loads(routed.value)
        errors = list(VALIDATORS[topic_schema].iter_errors(value))
        assert not errors, (value, errors[0].message)
        for other in set(contract.TOPIC_SCHEMAS.values()) - {topic_schema}:
            assert not VALIDATORS[other].is_valid(value)  # `type` is each topic's constant


@pytest.mark.parametrize(
    ("doc", "envelope"),
    [
        ({"id": 7, "type": "message.inbound.received", "data": {"text": "hi"}}, "guide.envelope"),
        ({"id": "e", "event": {"type": "x.y"}, "data": [1]}, "guide.envelope"),
        ({"field": "accounts", "payload": [1], "timestamp": 1_767_225_600_000}, "sent.envelope"),
        ({"field": "message", "sub_type": "message.received"}, "sent.envelope"),
        # Routed by the code, refused by the schema: the sub-type in any case, and a 1969 local time
        # that is 1970 in UTC.
        ({"field": "message", "sub_type": "MESSAGE.RECEIVED"}, "sent.envelope"),
        (
            {"field": "message", "sub_type": "Message.Delivered", "payload": {"message_id": "m"}},
            "sent.envelope",
        ),
        (
            {
                "field": "message",
                "timestamp": "1969-12-31T23:00:00-02:00",
                "payload": {"id": "m", "status": "x"},
            },
            "sent.envelope",
        ),
        ({"field": "message", "payload": {"messageId": 5, "status": "SENT"}}, "sent.envelope"),
        (
            {"field": "message", "sub_type": "message.x", "timestamp": 0, "payload": {"id": "m"}},
            "sent.envelope",
        ),
        (
            {"field": "templates", "payload": {"templateId": "t", "status": "paused", "reason": None}},
            "sent.envelope",
        ),
    ],
)
def test_other_accepted_forms_validate(doc: dict[str, Any], envelope: str) -> None:
    body = orjson.dumps(doc)
    assert _envelope(body) == envelope
    VALIDATORS[envelope].validate(doc)
    routed = _route(body)
    if routed.event is not None:
        VALIDATORS[contract.TOPIC_SCHEMAS[routed.event.type]].validate(orjson.loads(routed.value))


@pytest.mark.parametrize(
    "doc",
    [
        {"field": "message", "sub_type": "message.read", "payload": {"note": "no message id"}},
        {"field": "message", "payload": {"message_id": "m"}},  # no status anywhere
        {"field": "templates", "payload": {"template_id": "t"}},
        {"id": "e", "event": {"type": "message.status.updated"}, "data": {"message_id": "m"}},
        {"id": "e", "data": {}},
    ],
)
def test_events_missing_their_keys_do_not_validate(doc: dict[str, Any]) -> None:
    assert not VALIDATORS[contract.ENVELOPE_SCHEMAS["guide" if "field" not in doc else "sent"]].is_valid(doc)


SCHEMA_CASES = [h for h in HOSTILE if h.in_schema]


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=[h.name for h in SCHEMA_CASES])
def test_hostile_bodies_do_not_validate(case: Hostile) -> None:
    doc = orjson.loads(case.body)
    shape = "sent" if isinstance(doc.get("field"), str) else "guide"
    assert not VALIDATORS[contract.ENVELOPE_SCHEMAS[shape]].is_valid(doc)


def test_hostile_canonical_values_do_not_validate() -> None:
    routed = _route(SampleFactory(3).template("t-1", "approved").body)
    good = orjson.loads(routed.value)
    v = VALIDATORS["template.approval.updated"]
    v.validate(good)
    for change in (
        {"id": True},
        {"id": "x" * (MAX_ID_LENGTH + 1)},
        {"received_at": 10**20},
        {"occurred_at": "99999-01-01T00:00:00Z"},
        {"status": None},
        {"status": "s" * 65},
        {"subject": "a\u0000"},
        {"data": {**good["data"], "template_id": ["t"]}},
        {"data": {**good["data"], "reason": 5}},
        {"type": EventType.MESSAGE_STATUS.value},
    ):
        assert not v.is_valid({**good, **change}), change
