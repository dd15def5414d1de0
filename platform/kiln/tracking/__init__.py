"""Run tracking: every train, tune (with its trials) and score run in an MLflow store, read back
as RunRecords by `kiln runs` and the report. Importing this package imports neither MLflow nor
Ray."""

from kiln.tracking.record import RunRecord
from kiln.tracking.store import Store, default_uri, flatten, open_store
from kiln.tracking.tracker import Tracker

__all__ = ["RunRecord", "Store", "Tracker", "default_uri", "flatten", "open_store"]
