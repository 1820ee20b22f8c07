"""Consumes vehicle messages from the MQTT broker and feeds them to the ingest pipeline.

A message is acknowledged to the broker (PUBACK) only after the pipeline stored it durably — or decided, with a
counted reason, that it must never be stored.
"""
