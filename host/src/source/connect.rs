//! Where and how to reach PostgreSQL: the source url (libpq's syntax and
//! parameters), its TLS and authentication settings, and the session settings every
//! connection sends. Parsing and checking only; connections are opened by
//! [`super::protocol`] (replication) and [`super::tls`] (ordinary SQL).
//!
//! Invariants:
//! - The password is never printed: `Debug` and [`ConnectConfig::redacted_url`] show
//!   `***`; it is zeroed when the configuration is dropped.
//! - A url that does not parse, or settings that contradict each other, are refused
//!   before any connection, with the parameter named.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroize;

use super::auth::{AuthPolicy, ChannelBinding};
use super::error::SourceError;

/// Session settings sent in the startup packet so that value text forms are predictable.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3 -c intervalstyle=postgres -c bytea_output=hex";

/// How long the whole connection setup (TCP, authentication, ReadyForQuery) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The `sslmode` of the source (libpq's names and meanings; see [`super::tls`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not
    /// checked. libpq's default, and airlock's.
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is not checked.
    Require,
    /// TLS, and the certificate chain must lead to `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Parses libpq's names; `None` for anything else.
    pub fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the server certificate is checked against `sslrootcert`.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The modes, for messages.
pub const SSL_MODES: &str = "`disable`, `prefer`, `require`, `verify-ca` or `verify-full`";

/// Where and as whom to connect, parsed from a `postgres://` url.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Host name, IP address, or a Unix socket directory (starting with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Never printed: `Debug` and [`ConnectConfig::redacted_url`] show `***`.
    pub password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// PEM file with the CA certificate(s) for `verify-ca` and `verify-full`.
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate (PEM) and its private key, sent when the server asks.
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// What the client accepts while the server authenticates it (`require_auth`,
    /// `channel_binding`).
    pub auth: AuthPolicy,
}

impl Drop for ConnectConfig {
    /// The password is zeroed when the configuration goes.
    fn drop(&mut self) {
        if let Some(password) = &mut self.password {
            password.zeroize();
        }
    }
}

impl fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("auth", &self.auth)
            .finish()
    }
}

impl std::str::FromStr for ConnectConfig {
    type Err = SourceError;
    fn from_str(url: &str) -> Result<Self, SourceError> {
        ConnectConfig::from_url(url)
    }
}

impl ConnectConfig {
    /// Parses `postgres[ql]://[user[:password]@][host][:port][/dbname][?param=value&...]`.
    ///
    /// Parameters: `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `require_auth`,
    /// `channel_binding` (libpq's meanings), `host` (e.g. a Unix socket directory),
    /// `port`, `user`, `password`, `dbname`. Defaults: host `localhost`, port 5432,
    /// user `postgres`, dbname = user, sslmode `prefer`.
    pub fn from_url(url: &str) -> Result<Self, SourceError> {
        let invalid = |reason: String| SourceError::InvalidUrl { reason };
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| {
                invalid("expected it to start with postgres:// or postgresql://".into())
            })?;
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let mut user = None;
        let mut password = None;
        if let Some(userinfo) = userinfo {
            let (u, p) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !u.is_empty() {
                user = Some(percent_decode(u).ok_or_else(|| {
                    invalid("the user name is not valid percent-encoded UTF-8".into())
                })?);
            }
            if let Some(p) = p {
                password = Some(percent_decode(p).ok_or_else(|| {
                    invalid("the password is not valid percent-encoded UTF-8".into())
                })?);
            }
        }
        if hostport.contains(',') {
            return Err(invalid("multiple hosts are not supported".into()));
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| invalid("missing `]` after an IPv6 address".into()))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| invalid("expected `:port` after `]`".into()))?,
                ),
            };
            (host.to_owned(), port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (hostport.to_owned(), None),
            }
        };
        let mut host = percent_decode(&host)
            .ok_or_else(|| invalid("the host is not valid percent-encoded UTF-8".into()))?;
        let mut port = port.map(parse_port).transpose()?;
        let mut dbname = match path {
            "" => None,
            p => Some(percent_decode(p).ok_or_else(|| {
                invalid("the database name is not valid percent-encoded UTF-8".into())
            })?),
        };
        let mut sslmode = SslMode::default();
        let mut sslrootcert = None;
        let mut sslcert = None;
        let mut sslkey = None;
        let mut auth = AuthPolicy::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = || {
                percent_decode(value).ok_or_else(|| {
                    invalid(format!(
                        "the value of `{key}` is not valid percent-encoded UTF-8"
                    ))
                })
            };
            match key {
                "sslmode" => {
                    sslmode = SslMode::parse(value).ok_or_else(|| {
                        invalid(format!(
                            "sslmode `{value}` is not one of disable, prefer, require, verify-ca, verify-full"
                        ))
                    })?
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(decoded()?)),
                "sslcert" => sslcert = Some(PathBuf::from(decoded()?)),
                "sslkey" => sslkey = Some(PathBuf::from(decoded()?)),
                "require_auth" => auth.require_auth = decoded()?.parse().map_err(invalid)?,
                "channel_binding" => {
                    auth.channel_binding = decoded()?.parse().map_err(invalid)?
                }
                "host" => host = decoded()?,
                "port" => port = Some(parse_port(value)?),
                "user" => user = Some(decoded()?),
                "password" => password = Some(decoded()?),
                "dbname" => dbname = Some(decoded()?),
                other => {
                    return Err(invalid(format!(
                        "unknown parameter `{other}`: supported are sslmode, sslrootcert, sslcert, sslkey, require_auth, channel_binding, host, port, user, password, dbname"
                    )));
                }
            }
        }
        let config = ConnectConfig {
            host: if host.is_empty() {
                "localhost".to_owned()
            } else {
                host
            },
            port: port.unwrap_or(5432),
            dbname: dbname.unwrap_or_else(|| user.clone().unwrap_or_else(|| "postgres".into())),
            user: user.unwrap_or_else(|| "postgres".into()),
            password,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            auth,
        };
        Ok(config)
    }

    /// Builds a config directly (for tests and embedding).
    pub fn new(host: &str, port: u16, user: &str, password: Option<&str>, dbname: &str) -> Self {
        ConnectConfig {
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            password: password.map(str::to_owned),
            dbname: dbname.to_owned(),
            sslmode: SslMode::Disable,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            auth: AuthPolicy::default(),
        }
    }

    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// Checks the TLS and authentication settings without I/O: the verifying modes
    /// need `sslrootcert`, and only they use it; a client certificate needs both
    /// files; `channel_binding=require` needs TLS.
    pub fn check_tls(&self) -> Result<(), SourceError> {
        let reason = match (self.sslmode.verifies(), &self.sslrootcert) {
            (true, None) => format!(
                "sslmode={} verifies the server certificate, but no sslrootcert is set: set it to a PEM file with the CA certificate",
                self.sslmode.as_str()
            ),
            (false, Some(path)) => format!(
                "sslrootcert `{}` is set, but sslmode={} does not check certificates: use sslmode=verify-full (or verify-ca), or remove sslrootcert",
                path.display(),
                self.sslmode.as_str()
            ),
            _ if self.sslcert.is_some() != self.sslkey.is_some() => {
                "a client certificate needs both sslcert and sslkey: set the other one too, or neither".into()
            }
            _ if self.sslcert.is_some() && self.sslmode == SslMode::Disable => {
                "sslcert is set, but sslmode=disable never sends it: use sslmode=verify-full, or remove sslcert and sslkey".into()
            }
            _ if self.auth.channel_binding == ChannelBinding::Require
                && (self.sslmode == SslMode::Disable || self.is_unix_socket()) =>
            {
                "channel_binding=require needs TLS, but this connection is never encrypted (sslmode=disable or a Unix socket): use sslmode=verify-full, or channel_binding=prefer".into()
            }
            _ => return Ok(()),
        };
        Err(SourceError::TlsSetup { reason })
    }

    /// The url with the password shown as `***`: safe to log.
    pub fn redacted_url(&self) -> String {
        let mut url = String::from("postgres://");
        url.push_str(&percent_encode(&self.user));
        if self.password.is_some() {
            url.push_str(":***");
        }
        url.push('@');
        if self.host.contains(':') && !self.host.starts_with('/') {
            url.push('[');
            url.push_str(&self.host);
            url.push(']');
        } else {
            url.push_str(&percent_encode(&self.host));
        }
        url.push_str(&format!(
            ":{}/{}?sslmode={}",
            self.port,
            percent_encode(&self.dbname),
            self.sslmode.as_str()
        ));
        if !self.auth.require_auth.is_default() {
            url.push_str(&format!("&require_auth={}", self.auth.require_auth));
        }
        if self.auth.channel_binding != ChannelBinding::default() {
            url.push_str(&format!(
                "&channel_binding={}",
                self.auth.channel_binding.as_str()
            ));
        }
        url
    }

    /// `host:port`, or the socket path for a Unix socket directory: for messages.
    pub fn addr(&self) -> String {
        if self.is_unix_socket() {
            self.socket_path()
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub(crate) fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    pub(crate) fn socket_path(&self) -> String {
        format!("{}/.s.PGSQL.{}", self.host.trim_end_matches('/'), self.port)
    }

    /// A tokio-postgres config for ordinary (non-replication) SQL connections,
    /// with the same session settings as the replication connection. Connect with
    /// [`ConnectConfig::connect_sql`], which applies the TLS checks and the
    /// authentication policy.
    pub fn tokio_postgres_config(&self) -> tokio_postgres::Config {
        use tokio_postgres::config::ChannelBinding as Pg;
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("airlock")
            .options(SESSION_OPTIONS)
            .ssl_mode(self.tokio_postgres_ssl_mode())
            .channel_binding(match self.auth.channel_binding {
                ChannelBinding::Disable => Pg::Disable,
                ChannelBinding::Prefer => Pg::Prefer,
                ChannelBinding::Require => Pg::Require,
            })
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(password) = &self.password {
            config.password(password);
        }
        config
    }

    /// tokio-postgres decides whether to ask for TLS; what is checked is up to
    /// [`super::tls::RustlsConnect`]. Unix sockets never use TLS.
    fn tokio_postgres_ssl_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self.sslmode {
            _ if self.is_unix_socket() => Pg::Disable,
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

fn parse_port(text: &str) -> Result<u16, SourceError> {
    text.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| SourceError::InvalidUrl {
            reason: format!("port `{text}` is not a number between 1 and 65535"),
        })
}

/// `text` with its `%XY` escapes decoded; `None` when an escape is not two hex digits
/// or the result is not UTF-8 (libpq refuses both).
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let escapes_valid = text.split('%').skip(1).all(|rest| {
        let digits = rest.as_bytes().get(..2);
        digits.is_some_and(|d| d.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_valid {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()?;
    Some(decoded.into_owned())
}

/// Bytes a URL component keeps as they are: RFC 3986's unreserved characters.
const URL_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, URL_COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let c = ConnectConfig::from_url(
            "postgres://app:s3cr%40t@db.internal:6543/orders?sslmode=disable",
        )
        .unwrap();
        assert_eq!(c.host, "db.internal");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "app");
        assert_eq!(c.password.as_deref(), Some("s3cr@t"));
        assert_eq!(c.dbname, "orders");
        assert_eq!(c.sslmode, SslMode::Disable);
        assert_eq!(c.addr(), "db.internal:6543");
    }

    #[test]
    fn url_defaults_and_variants() {
        let c = ConnectConfig::from_url("postgresql://").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str(), c.dbname.as_str()),
            ("localhost", 5432, "postgres", "postgres")
        );
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert!(!c.has_password());

        let c = ConnectConfig::from_url("postgres://alice@/").unwrap();
        assert_eq!((c.user.as_str(), c.dbname.as_str()), ("alice", "alice"));

        let c = ConnectConfig::from_url("postgres://u:p%3Aw%2Fd@[::1]:5433/d%20b").unwrap();
        assert_eq!(c.host, "::1");
        assert_eq!(c.port, 5433);
        assert_eq!(c.password.as_deref(), Some("p:w/d"));
        assert_eq!(c.dbname, "d b");
        assert_eq!(c.addr(), "[::1]:5433");

        // A password with an unencoded '@' still splits at the last '@'.
        let c = ConnectConfig::from_url("postgres://u:a@b@h/d").unwrap();
        assert_eq!((c.password.as_deref(), c.host.as_str()), (Some("a@b"), "h"));

        let c =
            ConnectConfig::from_url("postgres:///db?host=%2Ftmp%2Fpg&port=5499&user=x").unwrap();
        assert_eq!(c.host, "/tmp/pg");
        assert_eq!(c.addr(), "/tmp/pg/.s.PGSQL.5499");
        assert_eq!(c.user, "x");
        assert_eq!(c.dbname, "db");

        let c = ConnectConfig::from_url("postgres://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(c.host, "/var/run/postgresql");
    }

    #[test]
    fn bad_urls_are_clear_errors_without_the_password() {
        for (url, needle) in [
            ("mysql://u:hunter2@h/d", "postgres://"),
            ("postgres://u:hunter2@h:0/d", "port `0`"),
            ("postgres://u:hunter2@h:99999/d", "port `99999`"),
            (
                "postgres://u:hunter2@h/d?foo=bar",
                "unknown parameter `foo`",
            ),
            ("postgres://u:hunter2@h/d?sslmode=maybe", "sslmode `maybe`"),
            ("postgres://u:hunter2@a,b/d", "multiple hosts"),
            ("postgres://u:hunter%zz@h/d", "password is not valid"),
        ] {
            let err = ConnectConfig::from_url(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
            assert!(!err.contains("hunter"), "{url}: {err}");
        }
    }

    #[test]
    fn tls_settings_are_parsed_and_checked() {
        for (mode, expected) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
        ] {
            let c = ConnectConfig::from_url(&format!("postgres://u:hunter2@h/d?sslmode={mode}"))
                .unwrap();
            assert_eq!(c.sslmode, expected);
            c.check_tls().unwrap();
        }
        let c = ConnectConfig::from_url(
            "postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(
            c.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        c.check_tls().unwrap();

        let c = ConnectConfig::from_url("postgres://u:hunter2@h/d?sslmode=verify-ca").unwrap();
        let msg = c.check_tls().unwrap_err().to_string();
        assert!(msg.contains("no sslrootcert is set"), "{msg}");
        assert!(!msg.contains("hunter"), "{msg}");
        let c =
            ConnectConfig::from_url("postgres://u:hunter2@h/d?sslmode=require&sslrootcert=ca.pem")
                .unwrap();
        let msg = c.check_tls().unwrap_err().to_string();
        assert!(msg.contains("does not check certificates"), "{msg}");
    }

    #[test]
    fn authentication_settings_are_parsed_shown_and_checked() {
        let c = ConnectConfig::from_url(
            "postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=ca.pem&require_auth=scram-sha-256&channel_binding=require&sslcert=c.pem&sslkey=k.pem",
        )
        .unwrap();
        assert_eq!(c.auth.require_auth.to_string(), "scram-sha-256");
        assert_eq!(c.auth.channel_binding, ChannelBinding::Require);
        assert_eq!(c.sslcert.as_deref(), Some(std::path::Path::new("c.pem")));
        assert_eq!(c.sslkey.as_deref(), Some(std::path::Path::new("k.pem")));
        c.check_tls().unwrap();
        let shown = c.redacted_url();
        assert!(
            shown.ends_with("&require_auth=scram-sha-256&channel_binding=require"),
            "{shown}"
        );
        for (url, words) in [
            (
                "postgres://u@h/d?require_auth=kerberos",
                "`kerberos` is not one of",
            ),
            (
                "postgres://u@h/d?channel_binding=always",
                "channel_binding `always`",
            ),
        ] {
            let msg = ConnectConfig::from_url(url).unwrap_err().to_string();
            assert!(msg.contains(words), "{msg}");
        }
        for (url, words) in [
            (
                "postgres://u@h/d?sslmode=disable&channel_binding=require",
                "channel_binding=require needs TLS",
            ),
            (
                "postgres://u@h/d?sslmode=require&sslcert=c.pem",
                "both sslcert and sslkey",
            ),
            (
                "postgres://u@h/d?sslmode=disable&sslcert=c.pem&sslkey=k.pem",
                "never sends it",
            ),
        ] {
            let msg = ConnectConfig::from_url(url)
                .unwrap()
                .check_tls()
                .unwrap_err()
                .to_string();
            assert!(msg.contains(words), "{url}: {msg}");
        }
    }

    #[test]
    fn password_is_redacted_everywhere() {
        let c = ConnectConfig::from_url("postgres://app:hunter2@db:5432/orders").unwrap();
        assert_eq!(
            c.redacted_url(),
            "postgres://app:***@db:5432/orders?sslmode=prefer"
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );
        let c = ConnectConfig::from_url("postgres://a%20b@[::1]/x").unwrap();
        assert_eq!(
            c.redacted_url(),
            "postgres://a%20b@[::1]:5432/x?sslmode=prefer"
        );
        // The redacted url parses back to the same place.
        let back = ConnectConfig::from_url(&c.redacted_url()).unwrap();
        assert_eq!(
            (back.host.clone(), back.user.clone(), back.dbname.clone()),
            (c.host.clone(), c.user.clone(), c.dbname.clone())
        );
    }

    #[test]
    fn tokio_postgres_config_carries_everything() {
        let c = ConnectConfig::from_url("postgres://app:pw@db:6000/orders").unwrap();
        let pg = c.tokio_postgres_config();
        assert_eq!(pg.get_user(), Some("app"));
        assert_eq!(pg.get_password(), Some(&b"pw"[..]));
        assert_eq!(pg.get_dbname(), Some("orders"));
        assert_eq!(pg.get_ports(), &[6000]);
        assert_eq!(pg.get_options(), Some(SESSION_OPTIONS));
    }
}
