"""Composition of the ingest service: registry, time-series store, pipeline and HTTP app over one data dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from cloud_ingest.api import create_app
from cloud_ingest.commands import CommandService, load_or_create_cloud_key
from cloud_ingest.db import create_engine_for, init_db
from cloud_ingest.influx_store import InfluxSettings, InfluxTimeSeriesStore
from cloud_ingest.pipeline import IngestPipeline
from cloud_ingest.registry import Registry
from cloud_ingest.tsstore import SqliteTimeSeriesStore, TimeSeriesStore
from protocol import Catalogue, load_catalogue


@dataclass
class IngestService:
    engine: Engine
    registry: Registry
    store: TimeSeriesStore
    pipeline: IngestPipeline
    app: FastAPI
    catalogue: Catalogue
    commands: CommandService

    @classmethod
    def open(
        cls,
        data_dir: Path,
        database_url: str | None = None,
        catalogue: Catalogue | None = None,
        replay_window: int = 4096,
        influx_url: str | None = None,
        influx_db: str = "zhilian",
        influx_username: str | None = None,
        influx_password: str | None = None,
        influx_token: str | None = None,
        influx_write_deadline_s: float = 30.0,
    ) -> IngestService:
        """Telemetry goes to InfluxDB when `influx_url` is given, else to the data dir's SQLite store."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        catalogue = catalogue if catalogue is not None else load_catalogue()
        engine = create_engine_for(database_url or f"sqlite:///{data_dir / 'registry.db'}")
        try:
            init_db(engine)
            registry = Registry(engine)
            store: TimeSeriesStore
            if influx_url:
                settings = InfluxSettings(
                    influx_url,
                    database=influx_db,
                    username=influx_username,
                    password=influx_password,
                    token=influx_token,
                    write_deadline_s=influx_write_deadline_s,
                )
                store = InfluxTimeSeriesStore(settings, catalogue, data_dir / "influx-quarantine.jsonl")
            else:
                store = SqliteTimeSeriesStore(data_dir / "telemetry.db", catalogue)
        except BaseException:
            engine.dispose()
            raise
        pipeline = IngestPipeline(registry, store, catalogue, CollectorRegistry(), replay_window=replay_window)
        # Signs commands with the data dir's cloud key; its acks and status metrics land in the pipeline's registry.
        commands = CommandService(engine, registry, load_or_create_cloud_key(data_dir), pipeline.metrics)
        app = create_app(registry, store, pipeline, catalogue, commands)
        return cls(engine, registry, store, pipeline, app, catalogue, commands)

    def close(self) -> None:
        self.store.close()
        self.engine.dispose()
