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
    /// The sink plugins that deliver notifications to callback URLs, in order: a callback
    /// goes to the first whose `schemes` list its URL's scheme (`webhook`: `http`,
    /// `https`; `mqtt`: `mqtt`, `mqtts`). Unset: [`DEFAULT_SINKS`], or the one `sink`
    /// names.
    pub sinks: Option<Vec<String>>,
    /// The one sink plugin, the form of the key before `sinks` (kept working): the same as
    /// `sinks = [sink]`. Not both.
    pub sink: Option<String>,
    /// Each plugin's own settings, by plugin name: `[plugins.settings.webhook]`.
    pub settings: std::collections::BTreeMap<String, toml::Table>,
    /// How long a plugin being loaded may take in `create` and in its first `routes`
    /// call, in seconds (1 to 600). Beyond it the load fails (logged; the previous version
    /// keeps serving) and the call is left to finish on its own thread.
    pub start_timeout_s: u64,
    /// How long a version loaded from a changed file stays on probation at most, in
    /// seconds (1 to 3600): the version it replaced stays loaded meanwhile, and a panic
    /// of the new one rolls back to it. Probation also ends after 20 calls without one.
    pub probation_s: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: None,
            auth: vec!["connector".into()],
            sinks: None,
            sink: None,
            settings: Default::default(),
            start_timeout_s: 30,
            probation_s: 60,
        }
    }
}

/// The sinks started when neither `sinks` nor `sink` is set: every built-in one.
pub const DEFAULT_SINKS: &[&str] = &["webhook", "mqtt"];

impl PluginsConfig {
    /// The sink plugins to start, in the order they are asked for a callback's scheme:
    /// `sinks`, else the one `sink` names, else [`DEFAULT_SINKS`].
    pub fn sink_names(&self) -> Vec<String> {
        match (&self.sinks, &self.sink) {
            (Some(sinks), _) => sinks.clone(),
            (None, Some(sink)) => vec![sink.clone()],
            (None, None) => DEFAULT_SINKS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The dotted key that names the sinks (for errors about one of them).
    pub fn sinks_key(&self) -> &'static str {
        if self.sinks.is_none() && self.sink.is_some() {
            "plugins.sink"
        } else {
            "plugins.sinks"
        }
    }

    /// Range checks serde cannot express: the first value out of range, its key relative
    /// to the section (see [`Invalid`]).
    pub fn check(&self) -> Result<(), Invalid> {
        if !(1..=600).contains(&self.start_timeout_s) {
            return Err(("start_timeout_s", "must lie between 1 and 600".into()));
        }
        if !(1..=3600).contains(&self.probation_s) {
            return Err(("probation_s", "must lie between 1 and 3600".into()));
        }
        if self.auth.is_empty() {
            return Err(("auth", "needs at least one auth backend".into()));
        }
        if let Some(sinks) = &self.sinks {
            if self.sink.is_some() {
                return Err((
                    "sink",
                    "set either `sinks` (a list) or `sink` (one sink, the older form), not both"
                        .into(),
                ));
            }
            if sinks.is_empty() {
                return Err((
                    "sinks",
                    "needs at least one sink (callbacks could not be delivered)".into(),
                ));
            }
            if let Some(name) = sinks
                .iter()
                .enumerate()
                .find_map(|(i, n)| sinks[..i].contains(n).then_some(n))
            {
                return Err(("sinks", format!("names `{name}` twice")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PluginsConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn sinks_default_to_every_built_in_and_the_older_sink_key_means_one() {
        let both = vec!["webhook".to_string(), "mqtt".to_string()];
        assert_eq!(PluginsConfig::default().sink_names(), both);
        assert_eq!(PluginsConfig::default().sinks_key(), "plugins.sinks");
        let old = parse("sink = \"webhook\"");
        assert_eq!(old.check(), Ok(()));
        assert_eq!(old.sink_names(), ["webhook"]);
        assert_eq!(old.sinks_key(), "plugins.sink");
        let new = parse("sinks = [\"mqtt\", \"webhook\"]");
        assert_eq!(new.check(), Ok(()));
        assert_eq!(new.sink_names(), ["mqtt", "webhook"]);
    }

    #[test]
    fn bad_sink_lists_name_the_key() {
        for (text, key, why) in [
            ("sinks = []", "sinks", "needs at least one sink"),
            ("sinks = [\"a\", \"b\", \"a\"]", "sinks", "names `a` twice"),
            (
                "sinks = [\"a\"]\nsink = \"a\"",
                "sink",
                "set either `sinks` (a list) or `sink`",
            ),
        ] {
            let (k, message) = parse(text).check().unwrap_err();
            assert_eq!(k, key, "{text}");
            assert!(message.contains(why), "{text}: {message}");
        }
    }
}
