"""Helpers shared by the tests (no tests here). Import them one way:
``from tests.support import tiny_params`` and call
``tiny_params.tiny_model(...)``."""
