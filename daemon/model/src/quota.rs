//! Traffic-limit counts, as stored.

/// One domain's transactions in one hour (hours since the Unix epoch), as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourCount {
    pub domain: String,
    pub hour: u64,
    pub count: u64,
}
