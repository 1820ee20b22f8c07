"""Composition of the ingest service: registry, time-series store, pipeline and HTTP app over one data dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from cloud_ingest.api import create_app
from cloud_ingest.db import create_engine_for, init_db
from cloud_ingest.pipeline import IngestPipeline
from cloud_ingest.registry import Registry
from cloud_ingest.tsstore import SqliteTimeSeriesStore
from protocol import Catalogue, load_catalogue


@dataclass
class IngestService:
    engine: Engine
    registry: Registry
    store: SqliteTimeSeriesStore
    pipeline: IngestPipeline
    app: FastAPI
    catalogue: Catalogue

    @classmethod
    def open(
        cls,
        data_dir: Path,
        database_url: str | None = None,
        catalogue: Catalogue | None = None,
        replay_window: int = 4096,
    ) -> IngestService:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        catalogue = catalogue if catalogue is not None else load_catalogue()
        engine = create_engine_for(database_url or f"sqlite:///{data_dir / 'registry.db'}")
        try:
            init_db(engine)
            registry = Registry(engine)
            store = SqliteTimeSeriesStore(data_dir / "telemetry.db", catalogue)
        except BaseException:
            engine.dispose()
            raise
        pipeline = IngestPipeline(registry, store, catalogue, CollectorRegistry(), replay_window=replay_window)
        app = create_app(registry, store, pipeline, catalogue)
        return cls(engine, registry, store, pipeline, app, catalogue)

    def close(self) -> None:
        self.store.close()
        self.engine.dispose()
