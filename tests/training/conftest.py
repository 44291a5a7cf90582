"""Pipeline fixtures (see tests/fixtures_pipeline.py)."""

from tests.fixtures_pipeline import play_files, prepared_data, trained_run  # noqa: F401
