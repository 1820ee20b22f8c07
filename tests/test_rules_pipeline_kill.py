"""Acceptance (issue 5): killing the ingest service in the middle of a rule's duration window and restarting it
still raises the alarm once — not twice and not never.

A real `zhilian serve` process (API + MQTT bridge + rules) consumes from a real Mosquitto; the test publishes a
vehicle's signed 1 Hz over-temperature samples (L2 needs 10 s at >= 55 °C), SIGKILLs the service right after
handing the broker samples in the middle of the window, and again around the sample that completes it, restarts
it on the same data directory each time, and re-publishes everything (what was stored comes back as duplicates).
The one alarm must be raised at the sample that completed the 10 s, as if nothing had happened.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_ingest.service import IngestService
from protocol.topics import Channel, topic
from tests.test_alarms_support import KEY, RULE, Vehicle, vin_of
from zhilian.broker import MosquittoProcess, free_port

VIN = vin_of(7)
SAMPLES = 16  # one per message, 1 s apart; L2 is reached at second 10


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


class Serve:
    """`zhilian serve` as a subprocess on the test's data dir, broker and HTTP port."""

    def __init__(self, data_dir: Path, broker: MosquittoProcess, http_port: int, log: Path) -> None:
        self.args = [
            sys.executable, "-m", "zhilian", "serve", "--data-dir", str(data_dir), "--http-port", str(http_port),
            "--mqtt-host", broker.host, "--mqtt-port", str(broker.port), "--log-level", "warning",
        ]  # fmt: skip
        self.api = f"http://127.0.0.1:{http_port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._healthy, 90, "zhilian serve did not come up")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"zhilian serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.api}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown path runs
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


class Publisher:
    def __init__(self, broker: MosquittoProcess) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="kill-test-vehicle")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, raw: bytes) -> None:
        """Returns once the broker has the message (PUBACK)."""
        info = self.client.publish(topic(VIN, Channel.TELEMETRY), raw, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def publisher(mosquitto: MosquittoProcess) -> Iterator[Publisher]:
    p = Publisher(mosquitto)
    yield p
    p.close()


def stored(data_dir: Path) -> set[int]:
    """Sequence numbers the ledger recorded for the vehicle (read-only, beside the running service)."""
    conn = sqlite3.connect(f"file:{data_dir / 'registry.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {seq for (seq,) in conn.execute("SELECT seq FROM message_ledger WHERE vin = ?", (VIN,))}
    finally:
        conn.close()


def test_kill_9_mid_duration_window_raises_the_alarm_exactly_once_on_time(
    tmp_path: Path, mosquitto: MosquittoProcess, publisher: Publisher
) -> None:
    data = tmp_path / "data"
    svc = IngestService.open(data)
    try:
        svc.registry.register_device(VIN, KEY.public_raw)
        viewer = svc.registry.create_api_key("viewer", "kill-test")
    finally:
        svc.close()
    v = Vehicle(VIN)
    messages = [v.batch(second, [56.0]) for second in range(SAMPLES)]  # seq = second + 1
    server = Serve(data, mosquitto, free_port(), tmp_path / "serve.log")

    def deliver(first: int, last: int) -> None:
        """Publish seconds first..last until every one is stored (the bridge may not be subscribed yet)."""
        wanted = set(range(first + 1, last + 2))
        deadline = time.monotonic() + 60
        while not wanted <= stored(data):
            assert time.monotonic() < deadline, f"not stored: {sorted(wanted - stored(data))}"
            for second in range(first, last + 1):
                if second + 1 not in stored(data):
                    publisher.publish(messages[second])
            time.sleep(0.5)

    try:
        server.start()
        deliver(0, 5)  # 6 s of the 10 s window are in
        for first, last in ((6, 8), (9, 11)):  # mid-window, then around the sample that completes it
            for second in range(first, last + 1):
                publisher.publish(messages[second])
            server.kill()
            server.start()
        deliver(0, SAMPLES - 1)  # everything, again: what was stored is a duplicate now
        headers = {"X-API-Key": viewer}
        alarms = httpx.get(
            f"{server.api}/v1/alarms", params={"vin": VIN, "rule": RULE}, headers=headers, timeout=10
        ).json()
        assert [(a["level"], a["opened_ms"], a["state"], a["peak"]) for a in alarms] == [
            (2, v.ts(10), "DETECTED", 56.0)
        ], alarms
        detail = httpx.get(f"{server.api}/v1/alarms/{alarms[0]['id']}", headers=headers, timeout=10).json()
        assert [(t["from_state"], t["to_state"]) for t in detail["transitions"]] == [(None, "DETECTED")]
    finally:
        server.stop()
