//! Configuration, in two phases: [`raw`] is what the TOML file says (serde, unknown
//! fields refused, read by [`shape`] so that every mistake in it is found), [`Config`]
//! is what airlock runs with (typed, defaults applied, secrets read from the
//! environment). [`Config::from_toml`] reports every problem at once, each with the
//! path of the field, what it found and what it expected.
//!
//! Each section is checked in its own module into the settings of the part that
//! uses it: [`source`] into what the source connects with, [`plugins`] into the
//! guests' limits, [`sinks`] into each sink's own settings (with that sink's
//! defaults), [`admin`]. Configuration sits above the parts it configures: they never
//! import it.
//!
//! ```toml
//! [source]
//! url = "postgres://airlock@db.internal:5432/app"   # password from password_env
//! password_env = "AIRLOCK_PG_PASSWORD"
//! publication = "airlock"
//! slot = "airlock"
//!
//! [plugins]
//! dir = "plugins"
//!
//! [sinks.lake]
//! type = "delta"
//! url = "file:///var/lib/airlock/lake"
//! ```

use std::path::Path;

pub mod admin;
mod check;
pub mod plugins;
pub mod policy;
pub mod raw;
mod shape;
pub mod sinks;
pub mod source;

pub use self::admin::AdminConfig;
pub use self::check::{ConfigError, ConfigIssue, parse_duration};
pub use self::plugins::{OnError, PluginsConfig, RequiredStage, default_cache_dir};
pub use self::sinks::{SinkConfig, SinkKind, SinkSettings};
pub use self::source::{Snapshot, SourceConfig};
use crate::sink::lake::LakeSettings;
use crate::sink::spine::SpineSettings;

/// The validated configuration airlock runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    pub plugins: PluginsConfig,
    /// In name order.
    pub sinks: Vec<SinkConfig>,
    pub admin: AdminConfig,
    /// The governance policy every row passes before any guest.
    pub policy: std::sync::Arc<crate::policy::Policy>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            issues: vec![ConfigIssue {
                path: "(file)".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&file, &text, base)
    }

    /// Validates configuration text; relative paths are taken from `base`, secrets
    /// from the process environment.
    pub fn from_toml(file: &str, text: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(file, text, base, &|var| std::env::var(var).ok())
    }

    /// Validates configuration text with secrets looked up through `env`: a pure
    /// function of its inputs.
    pub fn from_toml_with_env(
        file: &str,
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let error = |issues| ConfigError {
            file: file.to_owned(),
            issues,
        };
        let (raw, shape_issues) = shape::parse_raw(text).map_err(error)?;
        let mut check = check::Check::new(env, base);
        let source = source::validate(raw.source, &mut check);
        let mut plugins = plugins::validate(raw.plugins, &mut check);
        let sinks = sinks::validate(raw.sinks, source.as_ref(), &mut check);
        let admin = admin::validate(raw.admin, &mut check);
        let policy = policy::validate(raw.policy, &mut check);
        let mut sinks = sinks;
        // Every lake commit records the policy its rows passed; every spine, the
        // policy in force and what it denies.
        for sink in &mut sinks {
            match &mut sink.settings {
                SinkSettings::Delta(lake) => {
                    lake.commit_info
                        .insert("airlock.policy".into(), policy.version.clone().into());
                    lake.commit_info
                        .insert("airlock.policy_bundle".into(), policy.describe());
                }
                SinkSettings::Http(spine) => {
                    spine.mark_unattributed = source
                        .as_ref()
                        .is_some_and(|s| s.identity == crate::identity::Mode::Record);
                    spine.policy = Some(crate::sink::spine::PolicyRecord {
                        version: policy.version.clone(),
                        bundle: policy.describe(),
                    });
                }
            }
        }
        // A responsible stage is one the registry keeps exactly as pinned.
        if let Some((stage, classes)) = policy.custodian() {
            let mut pinned = false;
            for r in plugins.require.iter_mut().filter(|r| r.name == stage) {
                r.first = true;
                pinned |= r.sha256.is_some();
            }
            if !pinned {
                check.add(
                    "plugins.require",
                    format!(
                        "class{} {} name{} stage `{stage}` as responsible ([policy.classes]), and only a pinned stage may see raw values: add `{stage}@sha256:` and the SHA-256 of its .wasm (`sha256sum {stage}.wasm` in the plugin folder) to [plugins] require",
                        if classes.len() == 1 { "" } else { "es" },
                        classes.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "),
                        if classes.len() == 1 { "s" } else { "" },
                    ),
                );
            }
        }
        // Stages may write the routes the sinks take and the declared tags.
        let routes = sinks.iter().flat_map(|s| s.routes().iter().cloned());
        let names = crate::pipeline::names::Names::new(routes, plugins.tags.clone());
        plugins.limits.names = std::sync::Arc::new(names);

        // A field with the wrong type was reported (and left out) while parsing: the
        // checks above found it missing, which says nothing more. (Nor does a section
        // found empty when one of its entries was left out.)
        let reported: Vec<&str> = shape_issues
            .iter()
            .map(|i| shape::issue_field(&i.path))
            .collect();
        let mut issues = shape_issues.clone();
        issues.extend(check.issues.into_iter().filter(|i| {
            let field = shape::issue_field(&i.path);
            !reported.iter().any(|r| shape::related_fields(r, field))
        }));
        match source {
            Some(source) if issues.is_empty() => Ok(Config {
                source,
                plugins,
                sinks,
                admin,
                policy,
            }),
            _ => Err(error(issues)),
        }
    }

    /// The settings of every `delta` sink, in name order.
    pub fn lakes(&self) -> impl Iterator<Item = &LakeSettings> {
        self.sinks.iter().filter_map(|s| match &s.settings {
            SinkSettings::Delta(lake) => Some(lake),
            SinkSettings::Http(_) => None,
        })
    }

    /// The settings of every `http` sink, in name order.
    pub fn spines(&self) -> impl Iterator<Item = &SpineSettings> {
        self.sinks.iter().filter_map(|s| match &s.settings {
            SinkSettings::Http(spine) => Some(spine),
            SinkSettings::Delta(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::source::connect::SslMode;

    fn issues(text: &str) -> Vec<String> {
        match Config::from_toml("airlock.toml", text, Path::new("/etc/airlock")) {
            Ok(_) => Vec::new(),
            Err(e) => e.issues.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn stages_may_write_the_routes_sinks_take_and_the_declared_tags() {
        let load = |extra: &str| {
            Config::from_toml(
                "airlock.toml",
                &format!(
                    "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://a@h/d\"\n[plugins]\n{extra}\n\
                     [sinks.lake]\ntype = \"delta\"\nurl = \"file:///lake\"\nroutes = [\"default\", \"restricted\"]\n"
                ),
                Path::new("/etc/airlock"),
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .plugins
            .limits
            .names
        };
        let names = load("");
        names.check_route("restricted").unwrap();
        names.check_route("default").unwrap();
        assert!(names.check_route("spine").is_err());
        for tag in crate::pipeline::names::DEFAULT_TAGS {
            names.check_tag(tag).unwrap();
        }
        assert!(names.check_tag("pii:ada@example.com").is_err());
        let none = load("tags = []");
        assert!(none.check_tag("pii").is_err());
        let declared = load("tags = [\"finance\", \"pii:*\"]");
        declared.check_tag("finance").unwrap();
        declared.check_tag("pii:anything").unwrap();
        assert!(declared.check_tag("pii").is_err());
        let bad = issues(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://a@h/d\"\n[plugins]\ntags = [\"*\", \"p*i\"]\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file:///lake\"\n",
        );
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].contains("plugins.tags[0]") && bad[1].contains("plugins.tags[1]"),
            "{bad:?}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::from_toml(
            "airlock.toml",
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db\"\n[sinks.lake]\ntype = \"delta\"\nurl = \"file:///tmp/lake\"\n",
            Path::new("/etc/airlock"),
        )
        .unwrap();
        assert_eq!(config.source.slot, "airlock");
        assert_eq!(config.plugins.dir, PathBuf::from("/etc/airlock/plugins"));
        assert_eq!(config.sinks[0].routes(), ["default".to_string()]);
        let lake = config.lakes().next().unwrap();
        assert_eq!(lake.flush_interval, Duration::from_secs(5));
        assert_eq!(lake.app_id, "airlock:airlock");
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:8090");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let found = issues(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"mysql://x\"\nslot = \"Bad-Slot\"\n[sinks.lake]\ntype = \"parquet\"\nflush_interval = \"soon\"\n",
        );
        assert_eq!(
            found,
            vec![
                "source.url: expected a URL starting with `postgres://` or `postgresql://`",
                "source.slot: found `Bad-Slot`, expected 1 to 63 lowercase letters, digits or underscores (a PostgreSQL slot/publication name)",
                "sinks.lake.type: found `parquet`, expected `delta` or `http`",
                "sinks.lake.url: missing: expected `file:///absolute/dir` or `s3://bucket/prefix`",
                "sinks.lake.flush_interval: found `soon`, expected a duration like `500ms`, `5s`, `2m` or `1h`",
            ]
        );
    }

    #[test]
    fn a_policy_is_required_and_its_key_never_comes_from_the_file() {
        let base = "[source]\nurl = \"postgres://u@h/db\"\n[sinks.lake]\ntype = \"delta\"\nurl = \"file:///l\"\n";
        let found = issues(base);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("policy: missing: airlock lets out only what a policy allows"),
            "{found:?}"
        );
        let load = |policy: &str, env: &dyn Fn(&str) -> Option<String>| {
            Config::from_toml_with_env(
                "a.toml",
                &format!("{base}{policy}"),
                Path::new("/etc/airlock"),
                env,
            )
        };
        let hashing = "[policy]\nkey_env = \"K\"\n[policy.classes]\npii = { action = \"hmac\" }\n[policy.columns]\n\"public.*.email\" = \"pii\"\n";
        let long = |_: &str| Some("x".repeat(32));
        let config = load(hashing, &long).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.policy.default, crate::policy::Unclassified::Deny);
        assert_eq!(
            config.policy.key.as_ref().map(|k| k.id.as_str()),
            Some("k1")
        );
        let short = load(hashing, &|_| Some("short".into()))
            .unwrap_err()
            .to_string();
        assert!(
            short.contains(
                "policy.key_env: the environment variable `K` holds 5 bytes, expected at least 32"
            ),
            "{short}"
        );
        let unset = load(hashing, &|_| None).unwrap_err().to_string();
        assert!(
            unset.contains("policy.key_env: the environment variable `K` is not set"),
            "{unset}"
        );
        let keyless = load(&hashing.replace("key_env = \"K\"\n", ""), &long)
            .unwrap_err()
            .to_string();
        assert!(
            keyless.contains("class `pii` hashes with `hmac`, which needs a key"),
            "{keyless}"
        );
        let inline = load(
            &hashing.replace("key_env = \"K\"", "key = \"in the file\""),
            &long,
        )
        .unwrap_err()
        .to_string();
        assert!(inline.contains("unknown field `key`"), "{inline}");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let found = issues(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db\"\nslots = \"x\"\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file:///lake\"\n",
        );
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("source.slots (line 5): unknown field `slots`"),
            "{found:?}"
        );
    }

    #[test]
    fn an_http_sinks_key_file_defaults_to_its_slots_and_only_http_sinks_take_one() {
        let config = Config::from_toml(
            "airlock.toml",
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db\"\nslot = \"s1\"\n\
             [sinks.a]\ntype = \"http\"\nurl = \"http://h/events\"\n\
             [sinks.b]\ntype = \"http\"\nurl = \"http://h/events\"\nkey_file = \"keys/b.key\"\n",
            Path::new("/etc/airlock"),
        )
        .unwrap();
        let default = crate::sink::spine::default_key_file("s1").expect("HOME is set");
        assert!(default.ends_with("airlock/spine-s1.key"), "{default:?}");
        let spines: Vec<&SpineSettings> = config.spines().collect();
        assert_eq!(spines[0].key_file, Some(default));
        assert_eq!(
            spines[1].key_file,
            Some(PathBuf::from("/etc/airlock/keys/b.key"))
        );
        let found = issues(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db\"\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file:///l\"\nkey_file = \"k\"\n\
             [sinks.spine]\ntype = \"http\"\nurl = \"http://h/events\"\nkey_file = \"\"\n",
        );
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("sinks.lake.key_file: only `http` sinks take this field"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("sinks.spine.key_file: found an empty path"),
            "{found:?}"
        );
    }

    #[test]
    fn sslmode_comes_from_the_field_or_the_url_and_verifying_needs_a_ca() {
        let base = "[sinks.lake]\ntype = \"delta\"\nurl = \"file:///tmp/lake\"\n";
        let load = |source: &str| {
            Config::from_toml(
                "airlock.toml",
                &format!("[policy]\ndefault = \"allow\"\n[source]\n{source}\n{base}"),
                Path::new("/etc/airlock"),
            )
        };
        let c = load("url = \"postgres://u@h/db\"").unwrap();
        assert_eq!(
            (c.source.sslmode, c.source.sslrootcert),
            (SslMode::Prefer, None)
        );
        let c = load("url = \"postgres://u@h/db?sslmode=require\"").unwrap();
        assert_eq!(c.source.sslmode, SslMode::Require);
        let c = load(
            "url = \"postgres://u:pw@h/db\"\nsslmode = \"verify-full\"\nsslrootcert = \"tls/ca.pem\"",
        )
        .unwrap();
        assert_eq!(c.source.sslmode, SslMode::VerifyFull);
        let connect = c.source.connect_config().unwrap();
        assert_eq!(connect.sslmode, SslMode::VerifyFull);
        assert_eq!(
            connect.sslrootcert.as_deref(),
            Some(Path::new("/etc/airlock/tls/ca.pem"))
        );
        assert_eq!(connect.password.as_deref(), Some("pw"));

        let found = issues(&format!(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db?sslmode=disable\"\nsslmode = \"require\"\n{base}"
        ));
        assert_eq!(
            found,
            vec![
                "source.sslmode: found `require`, but source.url says sslmode=disable: keep one of them"
            ]
        );
        let found = issues(&format!(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db\"\nsslmode = \"require\"\nsslrootcert = \"/ca.pem\"\n{base}"
        ));
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("source.sslrootcert: found `/ca.pem`, but sslmode `require` does not check certificates"), "{found:?}");
        let found = issues(&format!(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u:hunter2@h/db?sslmode=sometimes\"\n{base}"
        ));
        assert_eq!(
            found,
            vec![
                "source.url: sslmode `sometimes` is not one of disable, prefer, require, verify-ca, verify-full"
            ]
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
    }
}

/// Property tests over hostile configuration text: the parser and the validation never
/// panic, and every problem they report names a field path and says something.
#[cfg(test)]
mod fuzz {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// Every field the configuration knows, by section, to build plausible files from.
    const FIELDS: &[(&str, &[&str])] = &[
        (
            "source",
            &[
                "url",
                "password_env",
                "sslmode",
                "sslrootcert",
                "publication",
                "slot",
                "tables",
                "snapshot",
                "create_slot",
                "status_interval",
                "slot_busy_timeout",
                "spool_dir",
                "state_dir",
                "snapshot_connections",
                "sslcert",
                "sslkey",
                "require_auth",
                "channel_binding",
            ],
        ),
        (
            "plugins",
            &[
                "dir",
                "watch",
                "require",
                "on_error",
                "dead_letter_dir",
                "cache_dir",
                "tags",
            ],
        ),
        (
            "plugins.limits",
            &[
                "memory_mib",
                "deadline_ms",
                "output_bytes",
                "log_lines_per_second",
            ],
        ),
        (
            "sinks.lake",
            &[
                "type",
                "url",
                "routes",
                "flush_interval",
                "max_rows",
                "max_bytes",
                "storage_options",
                "compact_min_files",
                "token_env",
                "kinds",
                "watch",
                "default_kind",
                "dead_letter_dir",
            ],
        ),
        ("admin", &["listen", "token_env"]),
    ];

    /// A TOML value of any kind, with hostile text in it.
    fn value() -> impl Strategy<Value = String> {
        let text = prop_oneof![
            Just(String::new()),
            "[ -~]{0,40}",
            "\\PC{0,20}",
            Just("postgres://u:p@h:5432/db?sslmode=verify-full".to_owned()),
            Just("file:///tmp/lake".to_owned()),
            Just("s3://bucket/prefix".to_owned()),
            Just("10-mask@sha256:".to_owned() + &"a".repeat(64)),
            Just("0.0.0.0:8090".to_owned()),
            Just("5s".to_owned()),
            Just("-1ms".to_owned()),
        ];
        let scalar = prop_oneof![
            text.clone()
                .prop_map(|t| toml::Value::String(t).to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
        ];
        prop_oneof![
            3 => scalar.clone(),
            1 => prop::collection::vec(scalar, 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            1 => prop::collection::vec((text.clone(), text), 0..3).prop_map(|kv| {
                let inner: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{} = {}", toml::Value::String(k), toml::Value::String(v)))
                    .collect();
                format!("{{ {} }}", inner.join(", "))
            }),
        ]
    }

    /// A configuration file made of known sections and fields with random values.
    fn file() -> impl Strategy<Value = String> {
        let entry = (0..FIELDS.len(), any::<prop::sample::Index>(), value());
        prop::collection::vec(entry, 0..24).prop_map(|entries| {
            let mut by_section: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
            for (section, field, value) in entries {
                let (name, fields) = FIELDS[section];
                by_section
                    .entry(name)
                    .or_default()
                    .insert(*field.get(fields), value);
            }
            let mut text = String::new();
            for (section, fields) in by_section {
                text.push_str(&format!("[{section}]\n"));
                for (field, value) in fields {
                    text.push_str(&format!("{field} = {value}\n"));
                }
            }
            text
        })
    }

    fn check(text: &str) {
        let env = |var: &str| var.len().is_multiple_of(2).then(|| "secret".to_owned());
        if let Err(error) =
            Config::from_toml_with_env("fuzz.toml", text, Path::new("/etc/airlock"), &env)
        {
            for issue in &error.issues {
                assert!(!issue.message.is_empty(), "an empty message in {error}");
            }
            assert!(!error.to_string().is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn any_file_of_known_fields_is_validated_without_panicking(text in file()) {
            check(&text);
        }

        #[test]
        fn any_bytes_are_refused_or_validated_without_panicking(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            check(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn mutations_of_a_valid_file_are_validated_without_panicking(
            cut in 0usize..400,
            insert in "\\PC{0,8}",
        ) {
            let valid = "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db\"\nslot = \"s\"\n\
                         [plugins]\nrequire = [\"10-mask\"]\n[plugins.limits]\nmemory_mib = 64\n\
                         [sinks.lake]\ntype = \"delta\"\nurl = \"file:///tmp/lake\"\n\
                         [sinks.spine]\ntype = \"http\"\nurl = \"http://127.0.0.1:8093/events\"\n\
                         [admin]\nlisten = \"127.0.0.1:8090\"\n";
            let mut at = cut.min(valid.len());
            while !valid.is_char_boundary(at) {
                at -= 1;
            }
            check(&format!("{}{insert}{}", &valid[..at], &valid[at..]));
        }
    }
}
