//! Notification events.
pub mod webhook;
