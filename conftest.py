"""Root conftest: the fixtures that start real peers live in ``tests/fixtures``."""

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.dicom",
    "tests.fixtures.kafka",
    "tests.fixtures.databases",
    "tests.fixtures.site",
]
