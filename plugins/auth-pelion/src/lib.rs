//! Placeholder: answers no credential as its own. Being written.

use connectord_plugin_sdk::auth::{AuthVerdict, OP_AUTHENTICATE, OP_BOOTSTRAP};
use connectord_plugin_sdk::{Host, Kind, Plugin, declare_plugin};

pub struct Pelion;

impl Plugin for Pelion {
    const NAME: &'static str = "pelion";
    const KIND: Kind = Kind::Auth;

    fn create(_config: serde_json::Value, _host: Host) -> Result<Self, String> {
        Ok(Pelion)
    }

    fn call(&mut self, op: &str, _input: &[u8]) -> Result<Vec<u8>, String> {
        match op {
            OP_AUTHENTICATE => serde_json::to_vec(&AuthVerdict::NotMine).map_err(|e| e.to_string()),
            OP_BOOTSTRAP => Ok(b"{}".to_vec()),
            other => Err(format!("unknown operation {other}")),
        }
    }
}

declare_plugin!(Pelion);
