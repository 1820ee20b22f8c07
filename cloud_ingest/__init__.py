"""cloud_ingest"""
