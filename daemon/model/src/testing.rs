//! Sample records shared by the tests of the crates that store or render them (the
//! `testing` feature, enabled by their dev-dependencies only).

use crate::{EndpointSummary, ResourceSummary};

/// A registration of endpoint `e` in queue mode with every optional field set, and two
/// resources: `/3/0` with every attribute, `/1/0` with none. Its mbed JSON entry is
/// `{"ct":"application/vnd.oma.lwm2m+tlv","ep":"e","ept":"Sensor","lwm2m":"1.1","q":true,
/// "resources":[{"ct":"text/plain","if":"sensor","obs":true,"path":"/3/0","rf":"oma.lwm2m",
/// "rt":"oma.lwm2m","ver":"1.1"},{"obs":false,"path":"/1/0"}]}`.
pub fn endpoint_summary() -> EndpointSummary {
    EndpointSummary {
        ep: "e".into(),
        ept: "Sensor".into(),
        queue: true,
        resources: vec![
            ResourceSummary {
                path: "/3/0".into(),
                iface: Some("sensor".into()),
                rt: Some("oma.lwm2m".into()),
                ct: Some("text/plain".into()),
                obs: true,
                ver: Some("1.1".into()),
            },
            ResourceSummary {
                path: "/1/0".into(),
                iface: None,
                rt: None,
                ct: None,
                obs: false,
                ver: None,
            },
        ],
        lwm2m: Some("1.1".into()),
        ct: Some("application/vnd.oma.lwm2m+tlv".into()),
    }
}
