"""Test plugins: fixtures live in ``tests/fixtures/`` modules, loaded here."""

pytest_plugins = [
    "tests.fixtures.postgres_cluster",
    "tests.fixtures.bus",
    "tests.fixtures.kinesis",
]
