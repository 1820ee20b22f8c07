"""The vehicle agent: reads GNSS, BMS and controller, samples, batches, signs and publishes over MQTT.

Runs on the vehicle's controller board: it must never import cloud code (broker_bridge, cloud_ingest) or the
simulators, and keeps its import footprint small.
"""

# The agent's version in its status reports. A constant, not importlib.metadata, which costs the board's process
# ≈ 1 MB RSS (BENCHMARKS.md, agent footprint II). tests/test_ed25519.py keeps it equal to pyproject.toml's version.
AGENT_VERSION = "0.1.0"
