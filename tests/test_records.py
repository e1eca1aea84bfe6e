"""The stored record is a format of its own: what earlier code wrote still loads."""

import json

from service.api.schemas import Classifier
from service.storage.records import SCHEMA_VERSION, ClassifierRecord

#: A ready classifier's record.json exactly as the code before `schema_version` wrote it.
RECORD_BEFORE_SCHEMA_VERSION = """{"id":"clf_00abcdefghijklmnopqr","name":"ants-vs-bees",
"status":"ready","labels":["ants","bees"],"created_at":"2026-11-20T10:00:00Z",
"updated_at":"2026-11-20T10:05:00Z","dataset":{"images":245,"per_label":{"ants":124,"bees":121},
"skipped":[{"path":"train/ants/x.gif","reason":"not an image"}]},"progress":null,
"metrics":{"val_accuracy":0.94,"val_loss":0.18},"backbone":{"name":"vgg16","weights":"imagenet",
"image_size":224,"features":"block4+block5 avg+max","source":"keras cache","fingerprint":"d9a2"},
"error":null,"options":{"name":null,"validation_split":0.2,"max_epochs":100,"patience":10,
"learning_rate":0.001,"batch_size":64,"seed":0,"augmentation":{"noise":8.0,"flip":true,
"rotation":15.0,"shift":0.1,"views":4},"head":"auto"},"attempts":1,"lease":null,
"run":"1-0a1b2c3d","head":{"hidden_units":0,"dropout":0.2,"l2":0.1},"training_seconds":312.5}"""


def test_a_record_written_before_schema_version_loads_as_version_1():
    record = ClassifierRecord.model_validate_json(RECORD_BEFORE_SCHEMA_VERSION)
    assert record.schema_version == 1
    assert record.run == "1-0a1b2c3d" and record.head.l2 == 0.1
    assert record.dataset.skipped[0].path == "train/ants/x.gif"


def test_records_are_written_with_the_current_schema_version():
    record = ClassifierRecord.model_validate_json(RECORD_BEFORE_SCHEMA_VERSION)
    written = json.loads(record.to_json())
    assert written["schema_version"] == SCHEMA_VERSION == 2
    assert ClassifierRecord.model_validate_json(record.to_json()) == \
        record.model_copy(update={"schema_version": SCHEMA_VERSION})


def test_the_public_resource_shows_no_job_bookkeeping():
    public = Classifier.from_record(ClassifierRecord.model_validate_json(
        RECORD_BEFORE_SCHEMA_VERSION)).model_dump()
    assert public["status"] == "ready" and public["metrics"]["val_accuracy"] == 0.94
    assert not {"lease", "run", "attempts", "schema_version", "head"} & set(public)


def test_fields_a_newer_writer_added_survive_a_round_trip():
    data = json.loads(RECORD_BEFORE_SCHEMA_VERSION) | {"schema_version": 3, "versions": 2}
    record = ClassifierRecord.model_validate(data)
    assert json.loads(record.to_json())["versions"] == 2
