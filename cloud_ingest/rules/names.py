"""The catalogue signal names the rules read (names are the contract; wire ids are never used here).

Every name is checked against the loaded catalogue when an engine is built, so a renamed signal fails the start
with a clear `RulesConfigError` rather than a rule that silently never fires.
"""

from __future__ import annotations

import re

from protocol.catalogue import Catalogue

LAT = "CurrentLocation.Latitude"
LON = "CurrentLocation.Longitude"
ALT = "CurrentLocation.Altitude"
GNSS_SPEED = "CurrentLocation.GNSSReceiver.GroundSpeed"
FIX_MODE = "CurrentLocation.GNSSReceiver.FixMode"
HDOP = "CurrentLocation.GNSSReceiver.HDOP"
SATS = "CurrentLocation.GNSSReceiver.SatellitesUsed"

WHEEL_SPEED = "Speed"
SUPPLY_CURRENT = "Powertrain.ElectricMotor.SupplyCurrent"
THROTTLE = "Chassis.Accelerator.PedalPosition"
SPEED_LIMIT = "Powertrain.ElectricMotor.ConfiguredSpeedLimit"
WHEEL_SIZE = "Chassis.Wheel.Size"

SOC = "Powertrain.TractionBattery.StateOfCharge"
SOH = "Powertrain.TractionBattery.StateOfHealth"
PACK_V = "Powertrain.TractionBattery.CurrentVoltage"
PACK_I = "Powertrain.TractionBattery.CurrentCurrent"  # positive = into the battery (charging)
TEMP_MAX = "Powertrain.TractionBattery.Temperature.Max"
TEMP_MIN = "Powertrain.TractionBattery.Temperature.Min"
CELL_V_MAX = "Powertrain.TractionBattery.CellVoltage.Max"
CELL_V_MIN = "Powertrain.TractionBattery.CellVoltage.Min"
NOMINAL_CAPACITY = "Powertrain.TractionBattery.NominalCapacity"
PROTECTION = "Powertrain.TractionBattery.ProtectionStatus"
CELL_COUNT = "Powertrain.TractionBattery.CellCount"
BARCODE = "Powertrain.TractionBattery.Barcode"

CELL_PREFIX = "Powertrain.TractionBattery.CellVoltage.Cell"
PROBE_PREFIX = "Powertrain.TractionBattery.Temperature.Probe"

GNSS_POSITION = (LAT, LON)
GNSS_QUALITY = (FIX_MODE, HDOP, SATS)


def numbered(catalogue: Catalogue, prefix: str) -> tuple[tuple[int, str], ...]:
    """(number, name) of every catalogue signal named `prefix` + a number, in numeric order."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    found = []
    for name in catalogue.names():
        m = pattern.match(name)
        if m:
            found.append((int(m.group(1)), name))
    return tuple(sorted(found))
