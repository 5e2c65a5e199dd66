//! Empty: this package only names wolfSSL's source crate (see Cargo.toml).
