//! `[plugins]`: the plugin host's section of the configuration file, with its defaults and
//! range checks. The daemon's configuration (`connectord::config`) embeds it as it is;
//! whether the names it gives are plugins that exist is [`crate::check_names`].

use std::path::PathBuf;

use connectord_core::config::Invalid;
use serde::Deserialize;

/// `[plugins]`: auth backends and notification sinks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Directory of plugin files (`lib<crate>.so`), watched: a changed file is loaded
    /// again and swapped in without a restart. Unset: only the built-in plugins
    /// (`connector`, `webhook`). The directory must not be writable by group or others.
    pub dir: Option<PathBuf>,
    /// Auth backends by plugin name, asked in this order; the first that recognises a
    /// credential decides.
    pub auth: Vec<String>,
    /// The plugin that delivers notifications to callback URLs.
    pub sink: String,
    /// Each plugin's own settings, by plugin name: `[plugins.settings.webhook]`.
    pub settings: std::collections::BTreeMap<String, toml::Table>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: None,
            auth: vec!["connector".into()],
            sink: "webhook".into(),
            settings: Default::default(),
        }
    }
}

impl PluginsConfig {
    /// Range checks serde cannot express: the first value out of range, its key relative
    /// to the section (see [`Invalid`]).
    pub fn check(&self) -> Result<(), Invalid> {
        if self.auth.is_empty() {
            return Err(("auth", "needs at least one auth backend".into()));
        }
        Ok(())
    }
}
