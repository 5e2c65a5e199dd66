use super::*;

#[test]
fn embedded_defaults_parse_and_match_code_defaults() {
    let c = Config::embedded().expect("etc/connectord.toml must parse");
    let d = Config {
        log: LogConfig::default(),
        runtime: RuntimeConfig::default(),
        state: StateConfig::default(),
        rest: RestConfig::default(),
        coap: CoapConfig::default(),
        registry: RegistryConfig::default(),
        requests: RequestsConfig::default(),
        notifications: NotificationsConfig::default(),
        lua: LuaConfig::default(),
        plugins: PluginsConfig::default(),
        limits: LimitsConfig::default(),
        cluster: ClusterConfig::default(),
    };
    assert_eq!(c, d, "etc/connectord.toml and the Default impls disagree");
}

#[test]
fn runtime_worker_threads_default_to_one_per_cpu() {
    assert_eq!(Config::embedded().unwrap().runtime.worker_threads, 0);
    let c = Config::parse("[runtime]\nworker_threads = 1\n", Source::Embedded).unwrap();
    assert_eq!(c.runtime.worker_threads, 1);
}

#[test]
fn empty_file_is_all_defaults() {
    let c = Config::parse("", Source::Embedded).unwrap();
    assert_eq!(c, Config::embedded().unwrap());
}

/// Table of bad inputs: (toml, expected line, expected column, expected key, text in message).
#[test]
fn parse_errors_name_line_column_and_key() {
    let cases: &[(&str, usize, usize, Option<&str>, &str)] = &[
        (
            "[rest]\nlisten = [\"127.0.0.1:8080\"]\nlisen = 3\n",
            3,
            1,
            Some("rest.lisen"),
            "unknown field `lisen`",
        ),
        (
            "[coap]\nmax_datagram = \"big\"\n",
            2,
            16,
            Some("coap.max_datagram"),
            "invalid type",
        ),
        (
            "[rest]\nlisten = [\"nonsense\"]\n",
            2,
            11,
            Some("rest.listen[0]"),
            "invalid socket address",
        ),
        ("[nosuch]\n", 1, 2, Some("nosuch"), "unknown field `nosuch`"),
        (
            "[coap]\nplain = \"local\"\n",
            2,
            9,
            Some("coap.plain"),
            "unknown variant `local`, expected one of `allow`, `loopback`, `deny`",
        ),
        ("[log\nlevel = 1\n", 1, 5, None, ""),
        (
            "[registry]\nmin_lifetime_s = -1\n",
            2,
            18,
            Some("registry.min_lifetime_s"),
            "",
        ),
    ];
    for (text, line, column, key, msg) in cases {
        let err = Config::parse(text, Source::File("x.toml".into())).unwrap_err();
        match &err {
            ConfigError::Parse {
                line: l,
                column: c,
                key: k,
                message,
                ..
            } => {
                assert_eq!((l, c), (line, column), "position for {text:?}: {err}");
                assert_eq!(k.as_deref(), *key, "key for {text:?}: {err}");
                assert!(message.contains(msg), "message for {text:?}: {err}");
                assert!(
                    err.to_string()
                        .starts_with(&format!("x.toml:{line}:{column}: ")),
                    "{err}"
                );
            }
            other => panic!("expected a parse error for {text:?}, got {other}"),
        }
    }
}

#[test]
fn range_errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        ("[coap]\nmax_datagram = 10\n", "coap.max_datagram"),
        (
            "[coap]\ntls_max_message_size = 100\n",
            "coap.tls_max_message_size",
        ),
        ("[coap]\ntls_cert = \"/etc/c.pem\"\n", "coap.tls_key"),
        ("[rest]\nlisten = []\n", "rest.listen"),
        ("[rest]\nmax_connections = 0\n", "rest.max_connections"),
        (
            "[rest]\nmax_connections_per_address = 0\n",
            "rest.max_connections_per_address",
        ),
        ("[rest]\nclient_timeout_s = 0\n", "rest.client_timeout_s"),
        (
            "[rest]\nauth_failures_per_minute = 60001\n",
            "rest.auth_failures_per_minute",
        ),
        (
            "[registry]\nmin_lifetime_s = 0\n",
            "registry.min_lifetime_s",
        ),
        (
            "[registry]\ndefault_domain = \"a/b\"\n",
            "registry.default_domain",
        ),
        (
            "[registry]\ndefault_lifetime_s = 0\n",
            "registry.default_lifetime_s",
        ),
        ("[registry]\nmax_endpoints = 0\n", "registry.max_endpoints"),
        ("[log]\nlevel = \"=[\"\n", "log.level"),
        ("[coap]\nblock_size = 100\n", "coap.block_size"),
        (
            "[coap]\nack_random_factor = 0.5\n",
            "coap.ack_random_factor",
        ),
        ("[requests]\nqueue_len = 0\n", "requests.queue_len"),
        ("[requests]\nmax_body = 0\n", "requests.max_body"),
        ("[requests]\nmax_body = 1023\n", "requests.max_body"),
        (
            "[runtime]\nworker_threads = 5000\n",
            "runtime.worker_threads",
        ),
        (
            "[state]\ncommit_delay_us = 10001\n",
            "state.commit_delay_us",
        ),
        ("[state]\ndir = \"\"\n", "state.dir"),
        (
            "[notifications]\nlong_poll_s = 0\n",
            "notifications.long_poll_s",
        ),
        (
            "[notifications]\nredeliver_after_s = 0\n",
            "notifications.redeliver_after_s",
        ),
        (
            "[notifications]\nretry_initial_ms = 5\nretry_max_ms = 1\n",
            "notifications.retry_initial_ms",
        ),
        (
            "[notifications]\nmax_concurrent_deliveries = 0\n",
            "notifications.max_concurrent_deliveries",
        ),
        (
            "[notifications]\nmax_concurrent_deliveries = 1025\n",
            "notifications.max_concurrent_deliveries",
        ),
        (
            "[notifications]\nwebsocket_ping_interval_s = 0\n",
            "notifications.websocket_ping_interval_s",
        ),
        (
            "[notifications]\nkey_check_interval_s = 0\n",
            "notifications.key_check_interval_s",
        ),
        (
            "[notifications]\nkey_check_interval_s = 86401\n",
            "notifications.key_check_interval_s",
        ),
        (
            "[notifications]\nmax_queued_bytes_per_key = 4095\n",
            "notifications.max_queued_bytes_per_key",
        ),
        (
            "[notifications]\nmax_batch_bytes = 4095\n",
            "notifications.max_batch_bytes",
        ),
        (
            "[plugins]\nstart_timeout_s = 0\n",
            "plugins.start_timeout_s",
        ),
        (
            "[plugins]\nstart_timeout_s = 601\n",
            "plugins.start_timeout_s",
        ),
        ("[plugins]\nprobation_s = 0\n", "plugins.probation_s"),
        ("[plugins]\nprobation_s = 3601\n", "plugins.probation_s"),
        (
            "[notifications]\nidle_channel_removal_s = 31536001\n",
            "notifications.idle_channel_removal_s",
        ),
        (
            "[limits]\ntransaction_quota = 0\n",
            "limits.transaction_quota",
        ),
        (
            "[limits]\nsave_interval_ms = 5\n",
            "limits.save_interval_ms",
        ),
        (
            "[limits]\nsave_interval_ms = 3600001\n",
            "limits.save_interval_ms",
        ),
    ];
    for (text, key) in cases {
        match Config::parse(text, Source::Embedded) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(&k, key, "{text:?}"),
            other => panic!("expected Invalid for {text:?}, got {other:?}"),
        }
    }
}

#[test]
fn missing_file_is_a_read_error() {
    let err = Config::load(Path::new("/nonexistent/connectord.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/connectord.toml"));
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("ab\ncé d", 7), (2, 4));
    assert_eq!(line_col("", 0), (1, 1));
}

/// `log.level`: (value, the filter it becomes, or None when refused).
#[test]
fn log_level_names_and_directives() {
    let cases: &[(&str, Option<&str>)] = &[
        ("info", Some("info")),
        ("warning", Some("warn")),
        ("WARNING", Some("warn")),
        (" Debug ", Some("debug")),
        ("off", Some("off")),
        ("info,connectord=debug", Some("info,connectord=debug")),
        (
            "connectord::coap=Warning, error",
            Some("connectord::coap=warn,error"),
        ),
        (
            "connectord[reg{ep=a}]=trace",
            Some("connectord[reg{ep=a}]=trace"),
        ),
        ("verbose", None),
        ("warnings", None),
        ("", None),
        (",info", None),
        ("info,", None),
        ("connectord", None),
        ("connectord=", None),
        ("connectord=loud", None),
        ("=info", None),
        ("3", None),
        ("connectord[reg{ep=a}]", None),
    ];
    for (text, want) in cases {
        assert_eq!(log_filter(text).ok().as_deref(), *want, "{text:?}");
        let toml = format!("[log]\nlevel = {text:?}\n");
        match (Config::parse(&toml, Source::Embedded), want) {
            (Ok(c), Some(w)) => assert_eq!(c.log.level, *w),
            (Err(ConfigError::Invalid { key, location, .. }), None) => {
                assert_eq!((key.as_str(), location), ("log.level", Some((2, 9))))
            }
            (other, _) => panic!("{text:?}: {other:?}"),
        }
    }
}

/// Range errors locate their key: (toml, key, line, column).
#[test]
fn range_errors_name_line_and_column() {
    let cases: &[(&str, &str, usize, usize)] = &[
        ("[coap]\nblock_size = 100\n", "coap.block_size", 2, 14),
        (
            "[coap]\nack_random_factor = 0.5\n",
            "coap.ack_random_factor",
            2,
            21,
        ),
        ("[rest]\nlisten = []\n", "rest.listen", 2, 10),
        ("coap.listen = []\n", "coap.listen", 1, 15),
        (
            "[registry]\nmax_endpoints = 0\n",
            "registry.max_endpoints",
            2,
            17,
        ),
        // The key is not in the file: its section is named.
        (
            "\n[notifications]\nretry_max_ms = 10\n",
            "notifications.retry_initial_ms",
            2,
            1,
        ),
    ];
    for (text, key, line, column) in cases {
        match Config::parse(text, Source::File("c.toml".into())) {
            Err(e @ ConfigError::Invalid { .. }) => {
                let ConfigError::Invalid {
                    key: k, location, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(
                    (k.as_str(), *location),
                    (*key, Some((*line, *column))),
                    "{text:?}"
                );
                assert!(
                    e.to_string()
                        .starts_with(&format!("c.toml:{line}:{column}: key `{key}`: ")),
                    "{e}"
                );
            }
            other => panic!("expected Invalid for {text:?}, got {other:?}"),
        }
    }
}

/// The HTTPS keys of `[rest]`: certificate and key together with `listen_tls`, neither
/// without it, no address both plain and HTTPS; each error names its key in full.
#[test]
fn rest_tls_errors_name_the_key() {
    let tls = "listen_tls = [\"127.0.0.1:8443\"]\n";
    let pair = "tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n";
    let cases: &[(String, &str, &str)] = &[
        (
            format!("[rest]\n{tls}tls_key = \"/k.pem\"\n"),
            "rest.tls_cert",
            "is needed with rest.listen_tls",
        ),
        (
            format!("[rest]\n{tls}tls_cert = \"/c.pem\"\n"),
            "rest.tls_key",
            "is needed with rest.listen_tls",
        ),
        (
            format!("[rest]\n{pair}"),
            "rest.tls_cert",
            "rest.listen_tls is empty",
        ),
        (
            format!("[rest]\n{tls}tls_cert = \"\"\ntls_key = \"/k.pem\"\n"),
            "rest.tls_cert",
            "an empty path",
        ),
        (
            format!("[rest]\nlisten = [\"127.0.0.1:8443\"]\n{tls}{pair}"),
            "rest.listen_tls",
            "127.0.0.1:8443 is also in rest.listen",
        ),
        (
            format!("[rest]\n{tls}{pair}tls_handshake_timeout_s = 0\n"),
            "rest.tls_handshake_timeout_s",
            "between 1 and 300",
        ),
        (
            "[rest]\nlisten = []\n".to_string(),
            "rest.listen",
            "here or in rest.listen_tls",
        ),
    ];
    assert_invalid(cases);
    // HTTPS alone (no plain listener), and port 0 in both lists, are fine.
    for text in [
        format!("[rest]\nlisten = []\n{tls}{pair}"),
        format!("[rest]\nlisten = [\"127.0.0.1:0\"]\nlisten_tls = [\"127.0.0.1:0\"]\n{pair}"),
    ] {
        Config::parse(&text, Source::Embedded).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
}

/// Each `(text, key, message)`: `text` is refused as invalid at `key` with a message
/// containing `message`.
fn assert_invalid<S: AsRef<str>>(cases: &[(S, &str, &str)]) {
    for (text, key, message) in cases {
        let text = text.as_ref();
        match Config::parse(text, Source::Embedded) {
            Err(ConfigError::Invalid {
                key: k, message: m, ..
            }) => assert!(k == *key && m.contains(message), "{text:?}: {k}: {m}"),
            other => panic!("expected Invalid for {text:?}, got {other:?}"),
        }
    }
}

/// Two listeners of one protocol on one address and port (the same address twice, or an
/// address and its family's wildcard) are refused, naming the later key and the earlier
/// one: `check-config` called them valid and `run` failed to bind (an outside review).
/// Different protocols, families, ports, and port 0 are fine.
#[test]
fn listeners_that_would_share_an_address_are_refused() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[rest]\nlisten = [\"127.0.0.1:8080\", \"127.0.0.1:8080\"]\n",
            "rest.listen",
            "127.0.0.1:8080 is also in rest.listen",
        ),
        (
            "[coap]\nlisten = [\"0.0.0.0:5683\", \"127.0.0.1:5683\"]\n",
            "coap.listen",
            "127.0.0.1:5683 overlaps 0.0.0.0:5683 in coap.listen",
        ),
        (
            "[rest]\nlisten = [\"127.0.0.1:5684\"]\n[coap]\nlisten_tls = [\"127.0.0.1:5684\"]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n",
            "coap.listen_tls",
            "127.0.0.1:5684 is also in rest.listen",
        ),
        (
            "[coap]\nlisten = [\"127.0.0.1:5683\"]\nlisten_dtls = [\"0.0.0.0:5683\"]\n",
            "coap.listen_dtls",
            "0.0.0.0:5683 overlaps 127.0.0.1:5683 in coap.listen",
        ),
        // The REST sockets are dual-stack: `[::]` takes IPv4 too.
        (
            "[rest]\nlisten = [\"0.0.0.0:8080\", \"[::]:8080\"]\n",
            "rest.listen",
            "[::]:8080 overlaps 0.0.0.0:8080 in rest.listen",
        ),
    ];
    assert_invalid(cases);
    for text in [
        // UDP and TCP on one port; IPv4 and IPv6 (IPV6_V6ONLY); port 0 twice.
        "[rest]\nlisten = [\"127.0.0.1:5683\"]\n[coap]\nlisten = [\"127.0.0.1:5683\"]\n",
        "[coap]\nlisten = [\"0.0.0.0:5683\", \"[::]:5683\"]\n",
        "[rest]\nlisten = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\n",
        "[coap]\nlisten = [\"127.0.0.1:5683\", \"127.0.0.2:5683\"]\n",
    ] {
        Config::parse(text, Source::Embedded).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
}

/// `[cluster]`: sqlite by default (nothing changes for existing users); nats with its
/// keys; out-of-range values named with file, line and key, a bad node name said to be no
/// NATS token.
#[test]
fn cluster_section_defaults_and_errors() {
    let c = Config::embedded().unwrap().cluster;
    assert_eq!(c.backend, Backend::Sqlite);
    assert_eq!(c.prefix, "cd");
    assert_eq!(c.replicas, 1);
    assert!(
        c.node_name()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    );
    let c = Config::parse(
        "[cluster]\nbackend = \"nats\"\nservers = [\"nats://127.0.0.1:14222\", \"nats://127.0.0.1:14223\"]\nnode = \"n-1\"\nprefix = \"fleet_a\"\nreplicas = 3\ntimeout_ms = 2000\n",
        Source::Embedded,
    )
    .unwrap()
    .cluster;
    assert_eq!(c.backend, Backend::Nats);
    assert_eq!(c.servers.len(), 2);
    assert_eq!(c.node_name(), "n-1");
    assert_eq!(
        (c.prefix.as_str(), c.replicas, c.timeout_ms),
        ("fleet_a", 3, 2000)
    );
    let file = Source::File("/etc/connectord/connectord.toml".into());
    for (text, key, line, words) in [
        (
            "[cluster]\nnode = \"a.b\"\n",
            "cluster.node",
            2,
            "not a valid NATS token",
        ),
        (
            "[cluster]\nnode = \"\"\n",
            "cluster.node",
            2,
            "not a valid NATS token",
        ),
        (
            "[cluster]\nreplicas = 0\n",
            "cluster.replicas",
            2,
            "not 1 to 5",
        ),
        (
            "[cluster]\nreplicas = 6\n",
            "cluster.replicas",
            2,
            "not 1 to 5",
        ),
        (
            "[cluster]\nprefix = \"a b\"\n",
            "cluster.prefix",
            2,
            "not a valid NATS token",
        ),
        (
            "[cluster]\ntimeout_ms = 10\n",
            "cluster.timeout_ms",
            2,
            "not 100 to 60000",
        ),
        (
            "\n[cluster]\nbackend = \"nats\"\nservers = []\n",
            "cluster.servers",
            4,
            "is empty",
        ),
        (
            "[cluster]\nbackend = \"nats\"\nservers = [\"http://127.0.0.1:4222\"]\n",
            "cluster.servers",
            3,
            "is not a server address",
        ),
    ] {
        let e = Config::parse(text, file.clone()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("/etc/connectord/connectord.toml:{line}:")),
            "{text}: {e}"
        );
        assert!(e.contains(&format!("key `{key}`")), "{text}: {e}");
        assert!(e.contains(words), "{text}: {e}");
    }
    let e = Config::parse("[cluster]\nbackend = \"etcd\"\n", file)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cluster.backend") && e.contains("sqlite"), "{e}");
}

/// A path that is empty or starts with `~` is refused, naming its key: `lua.dir = ""` was
/// taken as the working directory and `"~/x"` as a directory named `~` (an outside
/// review). Absolute and relative paths are fine.
#[test]
fn empty_paths_and_paths_with_a_tilde_are_refused() {
    assert_invalid(&[
        ("[lua]\ndir = \"\"\n", "lua.dir", "is empty"),
        ("[plugins]\ndir = \"\"\n", "plugins.dir", "is empty"),
        (
            "[state]\ndir = \"~/cd-state\"\n",
            "state.dir",
            "~/cd-state starts with ~, which only a shell expands",
        ),
        ("[lua]\ndir = \"~\"\n", "lua.dir", "starts with ~"),
        (
            "[coap]\ntls_cert = \"~alice/c.pem\"\ntls_key = \"/k.pem\"\n",
            "coap.tls_cert",
            "starts with ~",
        ),
        (
            "[rest]\nlisten_tls = [\"127.0.0.1:0\"]\ntls_cert = \"/c.pem\"\ntls_key = \"~/k.pem\"\n",
            "rest.tls_key",
            "starts with ~",
        ),
        (
            "[coap]\ntrusted_cas = [\"/etc/ca.pem\", \"~/ca.pem\"]\n",
            "coap.trusted_cas",
            "~/ca.pem starts with ~",
        ),
    ]);
    for fine in [
        "[lua]\ndir = \"rules\"\n",
        "[lua]\ndir = \"/etc/connectord/a~b\"\n",
        "[state]\ndir = \".\"\n",
    ] {
        assert!(Config::parse(fine, Source::Embedded).is_ok(), "{fine}");
    }
}
