"""broker_bridge"""
