//! The plugin SDK: the C ABI between connectord and its plugins.
//!
//! Status: the ABI is designed in `ARCHITECTURE.md` ("Plugins") and DESIGN §6; the host
//! loader and the `declare_plugin!` macro arrive with the plugin-system issue. Until then
//! this crate only fixes the ABI version number that both sides will check.

#![forbid(unsafe_code)]

/// Version of the plugin ABI. A plugin built for another version is refused at load.
pub const ABI_VERSION: u32 = 1;
