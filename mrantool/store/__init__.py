"""The feature store (Zarr v3): per-slide patch and cell embeddings with atomic commits, locks and provenance."""

from mrantool.store.check import check_store, store_warnings
from mrantool.store.fingerprint import file_fingerprint
from mrantool.store.locks import SlideLock
from mrantool.store.reader import FeatureStore, SlideFeatures
from mrantool.store.schema import SCHEMA_VERSION, make_identity, validate_slide_id
from mrantool.store.writer import SlideWriter

__all__ = [
    "SCHEMA_VERSION",
    "FeatureStore",
    "SlideFeatures",
    "SlideLock",
    "SlideWriter",
    "check_store",
    "file_fingerprint",
    "make_identity",
    "store_warnings",
    "validate_slide_id",
]
