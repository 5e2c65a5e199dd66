//! The built-in table of resource types: what TLV and text/plain cannot say themselves.
//!
//! Two small sorted tables, looked up by binary search:
//! - [`CORE`]: the OMA core objects 0–7 (Security, Server, Access Control, Device,
//!   Connectivity Monitoring, Firmware Update, Location, Connectivity Statistics), from the
//!   OMA object definitions (`LWM2M_Security-v1_1_1.xml`, `LWM2M_Server-v1_0.xml`,
//!   `LWM2M_Access_Control-v1_0_3.xml`, `LWM2M_Device-v1_1.xml`,
//!   `LWM2M_Connectivity_Monitoring-v1_0_2.xml`, `LWM2M_Firmware_Update-v1_0_3.xml` plus
//!   resource 4 of v1.0, `LWM2M_Location-v1_0.xml`, `LWM2M_Connectivity_Statistics-v1_0_4.xml`).
//! - [`REUSABLE`]: IPSO reusable resources (ids 5500 and up), which keep one meaning in
//!   every object of the OMA registry that uses them (the IPSO objects 3200–3350 and later
//!   ones), from the registry's definitions of 3200, 3303, 3311 and 3336. They are looked
//!   up for any object outside 0–7.
//!
//! Executable resources are listed (as [`Kind::Execute`]) so that a write to one is refused;
//! reading one is not meaningful, and a payload for one decodes like an unknown resource.

/// The data type of a resource, as the OMA object definitions name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    String,
    Integer,
    /// LwM2M 1.1 "Unsigned Integer".
    Unsigned,
    Float,
    Boolean,
    Opaque,
    /// Seconds since the Unix epoch; a signed integer on the wire.
    Time,
    /// "Objlnk": object id and instance id, shown as `"oid:iid"`.
    Objlnk,
    /// An executable resource: no value.
    Execute,
}

use Kind::*;

/// (object id, resource id, kind), sorted by object then resource.
const CORE: &[(u16, u16, Kind)] = &[
    // 0 LwM2M Security
    (0, 0, String),
    (0, 1, Boolean),
    (0, 2, Integer),
    (0, 3, Opaque),
    (0, 4, Opaque),
    (0, 5, Opaque),
    (0, 6, Integer),
    (0, 7, Opaque),
    (0, 8, Opaque),
    (0, 9, String),
    (0, 10, Integer),
    (0, 11, Integer),
    (0, 12, Integer),
    (0, 13, Unsigned),
    (0, 14, String),
    (0, 15, Integer),
    (0, 16, Integer),
    (0, 17, Objlnk),
    // 1 LwM2M Server
    (1, 0, Integer),
    (1, 1, Integer),
    (1, 2, Integer),
    (1, 3, Integer),
    (1, 4, Execute),
    (1, 5, Integer),
    (1, 6, Boolean),
    (1, 7, String),
    (1, 8, Execute),
    // 2 Access Control
    (2, 0, Integer),
    (2, 1, Integer),
    (2, 2, Integer),
    (2, 3, Integer),
    // 3 Device
    (3, 0, String),
    (3, 1, String),
    (3, 2, String),
    (3, 3, String),
    (3, 4, Execute),
    (3, 5, Execute),
    (3, 6, Integer),
    (3, 7, Integer),
    (3, 8, Integer),
    (3, 9, Integer),
    (3, 10, Integer),
    (3, 11, Integer),
    (3, 12, Execute),
    (3, 13, Time),
    (3, 14, String),
    (3, 15, String),
    (3, 16, String),
    (3, 17, String),
    (3, 18, String),
    (3, 19, String),
    (3, 20, Integer),
    (3, 21, Integer),
    (3, 22, Objlnk),
    // 4 Connectivity Monitoring
    (4, 0, Integer),
    (4, 1, Integer),
    (4, 2, Integer),
    (4, 3, Integer),
    (4, 4, String),
    (4, 5, String),
    (4, 6, Integer),
    (4, 7, String),
    (4, 8, Integer),
    (4, 9, Integer),
    (4, 10, Integer),
    // 5 Firmware Update
    (5, 0, Opaque),
    (5, 1, String),
    (5, 2, Execute),
    (5, 3, Integer),
    (5, 4, Boolean),
    (5, 5, Integer),
    (5, 6, String),
    (5, 7, String),
    (5, 8, Integer),
    (5, 9, Integer),
    // 6 Location
    (6, 0, Float),
    (6, 1, Float),
    (6, 2, Float),
    (6, 3, Float),
    (6, 4, Opaque),
    (6, 5, Time),
    (6, 6, Float),
    // 7 Connectivity Statistics
    (7, 0, Integer),
    (7, 1, Integer),
    (7, 2, Integer),
    (7, 3, Integer),
    (7, 4, Integer),
    (7, 5, Integer),
    (7, 6, Execute),
    (7, 7, Execute),
    (7, 8, Integer),
];

/// (reusable resource id, kind), sorted.
const REUSABLE: &[(u16, Kind)] = &[
    (5500, Boolean), // Digital Input State
    (5501, Integer), // Digital Input Counter
    (5502, Boolean), // Digital Input Polarity
    (5503, Integer), // Digital Input Debounce
    (5504, Integer), // Digital Input Edge Selection
    (5505, Execute), // Digital Input Counter Reset
    (5517, Opaque),  // Velocity
    (5518, Time),    // Timestamp
    (5601, Float),   // Min Measured Value
    (5602, Float),   // Max Measured Value
    (5603, Float),   // Min Range Value
    (5604, Float),   // Max Range Value
    (5605, Execute), // Reset Min and Max Measured Values
    (5700, Float),   // Sensor Value
    (5701, String),  // Sensor Units
    (5705, Float),   // Compass Direction
    (5706, String),  // Colour
    (5750, String),  // Application Type
    (5751, String),  // Sensor Type
    (5805, Float),   // Cumulative active power
    (5820, Float),   // Power factor
    (5850, Boolean), // On/Off
    (5851, Integer), // Dimmer
    (5852, Integer), // On time
    (6042, Integer), // Measurement Quality Indicator
    (6049, Integer), // Measurement Quality Level
    (6050, Float),   // Fractional Timestamp
    (6051, Float),   // Numeric Latitude
    (6052, Float),   // Numeric Longitude
    (6053, Float),   // Numeric Uncertainty
];

/// The kind of resource `rid` of object `oid`, when the table knows it.
pub(crate) fn kind(oid: u16, rid: u16) -> Option<Kind> {
    if oid <= 7 {
        CORE.binary_search_by(|&(o, r, _)| (o, r).cmp(&(oid, rid)))
            .ok()
            .map(|i| CORE[i].2)
    } else {
        REUSABLE
            .binary_search_by(|&(r, _)| r.cmp(&rid))
            .ok()
            .map(|i| REUSABLE[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_sorted_without_duplicates() {
        assert!(CORE.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)));
        assert!(REUSABLE.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn lookups() {
        let cases: &[(u16, u16, Option<Kind>)] = &[
            (3, 0, Some(String)),
            (3, 13, Some(Time)),
            (3, 4, Some(Execute)),
            (3, 99, None),
            (0, 1, Some(Boolean)),
            (6, 0, Some(Float)),
            (3303, 5700, Some(Float)),
            (3311, 5850, Some(Boolean)),
            (3311, 5851, Some(Integer)),
            (3200, 5500, Some(Boolean)),
            (3303, 5605, Some(Execute)),
            (3303, 0, None),
            // Reusable ids are not looked up in the core objects.
            (3, 5700, None),
        ];
        for &(o, r, k) in cases {
            assert_eq!(kind(o, r), k, "/{o}/x/{r}");
        }
    }
}
