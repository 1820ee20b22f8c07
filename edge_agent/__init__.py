"""The vehicle agent: reads GNSS, BMS and controller, samples, batches, signs and publishes over MQTT.

Runs on the vehicle's controller board: it must never import cloud code (broker_bridge, cloud_ingest) or the
simulators, and keeps its import footprint small.
"""
