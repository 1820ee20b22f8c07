"""Composition of the ingest service: registry, time-series store, pipeline and HTTP app over one data dir.

With hazard rules on (the default) the alarm service observes the pipeline (cloud_ingest/alarms.py); its periodic
task (offline rule, deadline escalation) and the notification dispatchers run only after `start_background()` —
`zhilian serve` calls it; tests and tools that only ingest do not get background threads. The one exception is the
northbound MQTT publisher (`north_mqtt`): its paho network thread connects from `open` on, so that `dispatch_once`
works without the dispatchers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from cloud_ingest.alarms import AlarmsConfig, AlarmService
from cloud_ingest.api import create_app
from cloud_ingest.commands import CommandService, load_or_create_cloud_key
from cloud_ingest.db import create_engine_for, init_db
from cloud_ingest.geofences import GeofenceService
from cloud_ingest.influx_store import InfluxSettings, InfluxTimeSeriesStore
from cloud_ingest.lifecycle import LifecycleService
from cloud_ingest.north_mqtt import NorthMqttConfig, NorthPublisher
from cloud_ingest.notify import (
    DEFAULT_MQTT_TOPIC,
    MqttPublish,
    MqttSink,
    Notifier,
    NotifyConfig,
    NotifyConfigError,
    Sink,
    WebhookConfig,
    WebhookSink,
    check_topic_template,
)
from cloud_ingest.pipeline import IngestPipeline
from cloud_ingest.registry import Registry
from cloud_ingest.retention import MaintenanceLoop, RetentionConfig
from cloud_ingest.rules import RuleEngine, load_rules
from cloud_ingest.rules.context import ZoneLookup
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
    alarms: AlarmService | None = None
    notifier: Notifier | None = None
    lifecycle: LifecycleService | None = None
    geofences: GeofenceService | None = None
    maintenance: MaintenanceLoop | None = None
    north: NorthPublisher | None = None

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
        hazard_rules: bool = True,
        rules_path: Path | None = None,
        alarms_config: AlarmsConfig | None = None,
        webhook: WebhookConfig | None = None,
        notify_config: NotifyConfig | None = None,
        mqtt_publish: MqttPublish | None = None,
        north_mqtt: NorthMqttConfig | None = None,
        north_topic: str = DEFAULT_MQTT_TOPIC,
        zones_at: ZoneLookup | None = None,
        clock: Callable[[], int] | None = None,
        retention: RetentionConfig | None = None,
    ) -> IngestService:
        """Telemetry goes to InfluxDB when `influx_url` is given, else to the data dir's SQLite store.

        `hazard_rules`: evaluate the rules file (`rules_path`, default the packaged one) on ingest and keep alarms;
        `webhook`: push alarm notifications there; `north_mqtt`: also publish them to `north_topic` (default
        north/alarms/{vin}) through a connection of this service's own (cloud_ingest/north_mqtt.py, closed by
        `close`), or `mqtt_publish`: through this (blocking, PUBACK-confirmed) publish function of an MQTT
        connection the caller owns (one of the two);
        `zones_at`: the geofence lookup the rules' context uses
        (default: this service's geofence index);
        `clock`: the alarm service's clock in unix ms (deadlines, offline rule), for tests.
        `retention`: raw telemetry retention and rollups (cloud_ingest/retention.py); when given, a maintenance
        thread enforces it from the start (stopped by `close`). None keeps everything, as tests and tools want.
        """
        if north_mqtt is not None and mqtt_publish is not None:
            raise NotifyConfigError("give north_mqtt or mqtt_publish, not both")
        metrics = CollectorRegistry()
        north = None
        if hazard_rules and (north_mqtt is not None or mqtt_publish is not None):
            check_topic_template(north_topic)
            if north_mqtt is not None:
                # Checks its TLS files now; connects only from `north.start()` below, once nothing else can fail.
                north = NorthPublisher(north_mqtt, metrics)
                mqtt_publish = north.publish
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
                store = InfluxTimeSeriesStore(settings, catalogue, data_dir / "influx-quarantine.jsonl", retention)
            else:
                store = SqliteTimeSeriesStore(data_dir / "telemetry.db", catalogue, retention)
        except BaseException:
            engine.dispose()
            raise
        pipeline = IngestPipeline(registry, store, catalogue, metrics, replay_window=replay_window)
        # Signs commands with the data dir's cloud key; its acks and status metrics land in the pipeline's registry.
        commands = CommandService(engine, registry, load_or_create_cloud_key(data_dir), pipeline.metrics)
        # Vehicle and battery life cycles follow every stored batch; the geofence index answers the rules' zone
        # lookups unless the caller brings its own.
        lifecycle = LifecycleService(engine, catalogue=catalogue, metrics=pipeline.metrics)
        pipeline.add_observer(lifecycle)
        geofences = GeofenceService(engine, metrics=pipeline.metrics)
        geofences.refresh()
        zones_at = zones_at if zones_at is not None else geofences.zones_at
        alarms = notifier = None
        if hazard_rules:
            sinks: list[Sink] = [WebhookSink(webhook)] if webhook is not None else []
            if mqtt_publish is not None:
                sinks.append(MqttSink(mqtt_publish, north_topic))
            # Delivery runs on the wall clock (retry timing), whatever clock the alarm workflow is given.
            notifier = Notifier(engine, sinks, notify_config, pipeline.metrics)
            rules = RuleEngine(load_rules(rules_path, catalogue), catalogue)
            alarms = AlarmService(engine, rules, notifier, alarms_config, zones_at, clock, pipeline.metrics)
            pipeline.add_observer(alarms)
        app = create_app(registry, store, pipeline, catalogue, commands, alarms, lifecycle, geofences)
        service = cls(
            engine, registry, store, pipeline, app, catalogue, commands, alarms, notifier, lifecycle, geofences
        )
        if north is not None:
            # Connects (and reconnects) in paho's thread from now on; a broker that is down is not an error.
            service.north = north.start()
        if retention is not None:
            service.maintenance = MaintenanceLoop(store, retention.every_s, name="telemetry").start()
        return service

    def start_background(self) -> None:
        """Start the alarm service's periodic task and the notification dispatchers (stopped by `close`)."""
        if self.alarms is not None:
            self.alarms.start()
        if self.notifier is not None:
            self.notifier.start()
        if self.geofences is not None:
            self.geofences.start()  # polls for fences other processes changed

    def close(self) -> None:
        if self.maintenance is not None:
            self.maintenance.stop()
        if self.geofences is not None:
            self.geofences.close()
        if self.alarms is not None:
            self.alarms.stop()
        if self.notifier is not None:
            self.notifier.close()
        if self.north is not None:
            self.north.close()  # after the dispatchers: none is publishing any more
        self.store.close()
        self.engine.dispose()
