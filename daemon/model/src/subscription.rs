//! Subscriptions and pre-subscription rules, as stored.

use serde::{Deserialize, Serialize};

/// A stored subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    pub key_id: String,
    pub domain: String,
    pub ep: String,
    pub path: String,
}

/// A key's stored pre-subscription rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresubRecord {
    pub key_id: String,
    pub domain: String,
    pub rules: Vec<PreSub>,
}

/// One pre-subscription rule, exactly as the REST API takes and returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreSub {
    #[serde(
        rename = "endpoint-name",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub endpoint_name: Option<String>,
    #[serde(
        rename = "endpoint-type",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub endpoint_type: Option<String>,
    #[serde(
        rename = "resource-path",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub resource_path: Option<Vec<String>>,
}
