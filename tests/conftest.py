"""Session fixtures: every server the tests talk to is real and started here (or named by a
``DATAPORT_TEST_*`` URL)."""

pytest_plugins = [
    "tests.fixtures.redis",
    "tests.fixtures.s3",
    "tests.fixtures.stack",
    "tests.fixtures.postgres",
    "tests.fixtures.opensearch",
    "tests.fixtures.notify",
    "tests.fixtures.oidc",
    "tests.fixtures.dynalite",
]
