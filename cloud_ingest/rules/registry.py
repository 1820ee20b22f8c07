"""Every rule the engine knows, by id. Adding a rule = one class in a rules module + one line here + its table
in the rules file (docs/RULES.md documents it)."""

from __future__ import annotations

from cloud_ingest.rules.base import Rule
from cloud_ingest.rules.battery_cells import (
    CellOverVoltage,
    CellUnderVoltage,
    CellVoltageSpread,
    InternalShortSuspected,
)
from cloud_ingest.rules.battery_state import BatteryAgeing, BatteryVehicleMismatch, BmsProtectionRepeated, SocJump
from cloud_ingest.rules.battery_thermal import (
    BatteryOverTemperature,
    ProbeTemperatureDifference,
    ThermalRunaway,
    ThermalRunawayPrecursor,
)
from cloud_ingest.rules.charging import (
    ChargingAfterFull,
    ChargingInNoChargingZone,
    ChargingOverVoltage,
    ChargingTemperature,
)
from cloud_ingest.rules.connectivity import VehicleOffline
from cloud_ingest.rules.motion import CrashOrFall, ElevatorEntrySuspected, GnssCutOrJamming, TheftWhileLocked
from cloud_ingest.rules.tampering import ControllerConfigMismatch, SpeedLimiterTampering, WheelSizeTampering

RULES: dict[str, type[Rule]] = {
    cls.ID: cls
    for cls in (
        ThermalRunaway,
        ThermalRunawayPrecursor,
        BatteryOverTemperature,
        ProbeTemperatureDifference,
        CellVoltageSpread,
        CellOverVoltage,
        CellUnderVoltage,
        InternalShortSuspected,
        SocJump,
        BmsProtectionRepeated,
        BatteryAgeing,
        BatteryVehicleMismatch,
        ChargingTemperature,
        ChargingOverVoltage,
        ChargingAfterFull,
        ChargingInNoChargingZone,
        SpeedLimiterTampering,
        WheelSizeTampering,
        ControllerConfigMismatch,
        ElevatorEntrySuspected,
        TheftWhileLocked,
        CrashOrFall,
        GnssCutOrJamming,
        VehicleOffline,
    )
}
