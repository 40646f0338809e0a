//! What a connection accepts while PostgreSQL authenticates it, on both connection
//! stacks: the replication client ([`super::protocol`]) and tokio-postgres for the
//! ordinary SQL connections ([`super::tls::AuthWatchedSocket`]).
//!
//! The server picks the authentication method, and on a connection whose certificate
//! is not verified so does anyone in the middle. A client that simply follows sends a
//! cleartext password when asked, accepts "trust", and computes as many SCRAM
//! iterations as it is told. Here the client decides what it accepts:
//!
//! ```text
//! server ─ AuthenticationRequest ─▶ AuthCheck::on_request ─ refused ─▶ definite error,
//!                                        │                              nothing answered
//!                                        └ accepted ─▶ the stack answers (password, SCRAM …)
//! ```
//!
//! Invariants:
//! - `require_auth` (libpq's setting and syntax) names the methods the client
//!   accepts; a request for any other method, or an `AuthenticationOk` without one
//!   when `none` is not accepted, is refused before the client sends anything.
//! - Once SCRAM has started, `AuthenticationOk` counts only after the server's final
//!   message (its signature, which the stack verifies) has arrived.
//! - The SCRAM iteration count the server asks for is at most [`MAX_SCRAM_ITERATIONS`]:
//!   a hostile server cannot make the client burn CPU for hours.
//! - `channel_binding=require`: only SCRAM-SHA-256-PLUS over TLS is accepted, so a
//!   man in the middle who terminates TLS cannot relay the exchange.
//! - A refusal names the server's request and the setting that refused it.

use std::fmt;
use std::str::FromStr;

/// PostgreSQL's default is 4096; libpq has no bound. One million iterations of
/// HMAC-SHA-256 take about half a second.
pub const MAX_SCRAM_ITERATIONS: u32 = 1_000_000;

/// The largest authentication message accepted (SASL messages are a few hundred bytes).
pub const MAX_AUTH_MESSAGE: usize = 64 * 1024;

/// An authentication method, by libpq's `require_auth` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The server accepted the client without a password (`trust`, `peer`, `cert`).
    None,
    Password,
    Md5,
    ScramSha256,
}

impl Method {
    const ALL: [Method; 4] = [
        Method::None,
        Method::Password,
        Method::Md5,
        Method::ScramSha256,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Password => "password",
            Method::Md5 => "md5",
            Method::ScramSha256 => "scram-sha-256",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    fn describe(self) -> &'static str {
        match self {
            Method::None => "no authentication (trust)",
            Method::Password => "a cleartext password",
            Method::Md5 => "an md5 password",
            Method::ScramSha256 => "SCRAM-SHA-256",
        }
    }
}

/// libpq's `require_auth`: a comma-separated list of the methods accepted
/// (`scram-sha-256`), or of the methods refused (`!password,!md5`). The default
/// accepts all four.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequireAuth {
    allowed: u8,
}

impl Default for RequireAuth {
    fn default() -> Self {
        RequireAuth { allowed: 0b1111 }
    }
}

impl RequireAuth {
    pub fn allows(self, method: Method) -> bool {
        self.allowed & method.bit() != 0
    }

    pub fn is_default(self) -> bool {
        self == RequireAuth::default()
    }
}

impl fmt::Display for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Method::ALL
            .iter()
            .filter(|m| self.allows(**m))
            .map(|m| m.as_str())
            .collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequireAuth({self})")
    }
}

/// The accepted names, for messages.
pub const METHOD_NAMES: &str = "none, password, md5, scram-sha-256 (or all negated with `!`)";

impl FromStr for RequireAuth {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut listed = 0u8;
        let mut negated = None;
        for item in text.split(',') {
            let item = item.trim();
            let (not, name) = match item.strip_prefix('!') {
                Some(name) => (true, name),
                None => (false, item),
            };
            if *negated.get_or_insert(not) != not {
                return Err(format!(
                    "require_auth `{text}` mixes methods with and without `!`: list the methods to accept, or only the ones to refuse"
                ));
            }
            let method = Method::ALL
                .into_iter()
                .find(|m| m.as_str() == name)
                .ok_or_else(|| {
                    format!("require_auth `{text}`: `{name}` is not one of {METHOD_NAMES}")
                })?;
            if listed & method.bit() != 0 {
                return Err(format!(
                    "require_auth `{text}` names `{name}` more than once"
                ));
            }
            listed |= method.bit();
        }
        let allowed = if negated == Some(true) {
            !listed & 0b1111
        } else {
            listed
        };
        if allowed == 0 {
            return Err(format!(
                "require_auth `{text}` refuses every method: leave at least one"
            ));
        }
        Ok(RequireAuth { allowed })
    }
}

/// libpq's `channel_binding`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind: SCRAM-SHA-256 even when the server offers -PLUS.
    Disable,
    /// Bind when the connection is TLS and the server offers SCRAM-SHA-256-PLUS.
    #[default]
    Prefer,
    /// Only SCRAM-SHA-256-PLUS over TLS; anything else is refused.
    Require,
}

impl ChannelBinding {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBinding::Disable => "disable",
            ChannelBinding::Prefer => "prefer",
            ChannelBinding::Require => "require",
        }
    }
}

impl FromStr for ChannelBinding {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => {
                return Err(format!(
                    "channel_binding `{other}` is not one of disable, prefer, require"
                ));
            }
        })
    }
}

/// What the client accepts while authenticating.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthPolicy {
    pub require_auth: RequireAuth,
    pub channel_binding: ChannelBinding,
}

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The policy applied to one connection's authentication requests, in order.
#[derive(Debug)]
pub struct AuthCheck {
    policy: AuthPolicy,
    /// Whether the connection is TLS (set once the handshake is done).
    tls: bool,
    /// Whether the TLS connection gives channel binding data (the server
    /// certificate's signature algorithm names a hash).
    binding: bool,
    method: Option<Method>,
    /// The server offered SCRAM-SHA-256-PLUS (and the connection is TLS).
    plus_offered: bool,
    scram_final: bool,
    done: bool,
}

impl AuthCheck {
    pub fn new(policy: AuthPolicy) -> Self {
        AuthCheck {
            policy,
            tls: false,
            binding: false,
            method: None,
            plus_offered: false,
            scram_final: false,
            done: false,
        }
    }

    /// The connection is TLS; `binding`: it gives channel binding data.
    pub fn set_tls(&mut self, binding: bool) {
        self.tls = true;
        self.binding = binding;
    }

    /// True once `AuthenticationOk` was accepted.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Whether the client should use SCRAM-SHA-256-PLUS (valid after an accepted SASL
    /// request).
    pub fn use_plus(&self) -> bool {
        self.plus_offered && self.policy.channel_binding != ChannelBinding::Disable
    }

    /// Checks an AuthenticationRequest (`R`) with its code and data; an `Err` is the
    /// reason to refuse it.
    pub fn on_request(&mut self, code: i32, data: &[u8]) -> Result<(), String> {
        let require = self.policy.require_auth;
        let method = match code {
            0 => {
                let method = *self.method.get_or_insert(Method::None);
                if method == Method::ScramSha256 && !self.scram_final {
                    return Err(
                        "the server said authentication succeeded before it proved it knows the password (no SCRAM server signature): the server is not the one the password was set on".into(),
                    );
                }
                if !require.allows(method) {
                    return Err(format!(
                        "the server accepted the connection with {}, but require_auth={require} does not accept that",
                        method.describe()
                    ));
                }
                if self.policy.channel_binding == ChannelBinding::Require && !self.use_plus() {
                    return Err(format!(
                        "the server accepted the connection with {}, but channel_binding=require accepts only SCRAM-SHA-256-PLUS",
                        method.describe()
                    ));
                }
                self.done = true;
                return Ok(());
            }
            3 => Method::Password,
            5 => Method::Md5,
            10 => Method::ScramSha256,
            11 | 12 => {
                if self.method != Some(Method::ScramSha256) {
                    return Err("the server sent a SASL message before starting SASL".into());
                }
                if code == 11 {
                    return check_server_first(data);
                }
                self.scram_final = true;
                return Ok(());
            }
            other => {
                let name = match other {
                    2 => "Kerberos V5",
                    6 => "SCM credentials",
                    7 | 8 => "GSSAPI",
                    9 => "SSPI",
                    _ => "an unknown method",
                };
                return Err(format!(
                    "the server asks for {name} (code {other}); airlock supports trust, password, md5 and scram-sha-256"
                ));
            }
        };
        if let Some(first) = self.method
            && first != method
        {
            return Err(format!(
                "the server asked for {} after asking for {}",
                method.describe(),
                first.describe()
            ));
        }
        self.method = Some(method);
        if !require.allows(method) {
            return Err(format!(
                "the server asks for {}, but require_auth={require} does not accept that: if the server is the right one, change its pg_hba.conf or require_auth",
                method.describe()
            ));
        }
        if method == Method::ScramSha256 {
            let mechanisms: Vec<&[u8]> =
                data.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
            let offers = |name: &str| mechanisms.contains(&name.as_bytes());
            self.plus_offered = self.tls && self.binding && offers(SCRAM_SHA_256_PLUS);
            let plain_ok = offers(SCRAM_SHA_256);
            if !plain_ok && !self.use_plus() {
                let offered: Vec<_> = mechanisms
                    .iter()
                    .map(|m| String::from_utf8_lossy(m))
                    .collect();
                return Err(format!(
                    "the server offers SASL mechanisms [{}]; airlock supports SCRAM-SHA-256 and, over TLS, SCRAM-SHA-256-PLUS",
                    offered.join(", ")
                ));
            }
        }
        if self.policy.channel_binding == ChannelBinding::Require && !self.use_plus() {
            let why = if !self.tls {
                "the connection is not TLS"
            } else if !self.binding {
                "the server certificate's signature algorithm gives no channel binding (airlock binds to RSA PKCS#1 and ECDSA certificates with SHA-1/2)"
            } else if method == Method::ScramSha256 {
                "the server does not offer SCRAM-SHA-256-PLUS"
            } else {
                "that is not SCRAM"
            };
            return Err(format!(
                "the server asks for {}, but channel_binding=require needs SCRAM-SHA-256-PLUS over TLS, and {why}",
                method.describe()
            ));
        }
        Ok(())
    }
}

/// Checks the server-first-message (`r=…,s=…,i=…`): the iteration count is bounded.
fn check_server_first(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data)
        .map_err(|_| "the server's SCRAM message is not UTF-8".to_owned())?;
    let iterations = text
        .split(',')
        .find_map(|attr| attr.strip_prefix("i="))
        .ok_or_else(|| "the server's SCRAM message has no iteration count".to_owned())?;
    match iterations.parse::<u32>() {
        Ok(n) if (1..=MAX_SCRAM_ITERATIONS).contains(&n) => Ok(()),
        _ => Err(format!(
            "the server asks for {iterations} SCRAM iterations; airlock computes at most {MAX_SCRAM_ITERATIONS} (PostgreSQL's default is 4096): lower scram_iterations on the server and set the password again"
        )),
    }
}

/// Watches the bytes a client reads from the server, frame by frame, until
/// authentication is over, and applies an [`AuthCheck`] to every request: for a
/// stack that authenticates by itself (tokio-postgres), fed from its read path.
#[derive(Debug)]
pub struct AuthWatch {
    pub check: AuthCheck,
    header: Vec<u8>,
    body: Vec<u8>,
    /// Bytes of the current frame's body still to come.
    remaining: usize,
    /// Past `AuthenticationOk` or an error: nothing more to watch.
    passive: bool,
    refused: Option<String>,
}

impl AuthWatch {
    pub fn new(policy: AuthPolicy) -> Self {
        AuthWatch {
            check: AuthCheck::new(policy),
            header: Vec::with_capacity(5),
            body: Vec::new(),
            remaining: 0,
            passive: false,
            refused: None,
        }
    }

    /// True once authentication is over: nothing more to watch.
    pub fn passive(&self) -> bool {
        self.passive
    }

    /// The reason the connection was refused, if it was.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Takes the next bytes read from the server; an `Err` (also for every call
    /// after one) means the connection must not go on.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        if let Some(reason) = &self.refused {
            return Err(reason.clone());
        }
        while !self.passive && !bytes.is_empty() {
            if self.header.len() < 5 {
                let take = (5 - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.header.len() < 5 {
                    break;
                }
                let len = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                let Some(body) = (len as usize).checked_sub(4) else {
                    return self.refuse("the server sent a message with a length below 4".into());
                };
                if self.header[0] == b'R' && body > MAX_AUTH_MESSAGE {
                    return self.refuse(format!(
                        "the server sent a {body}-byte authentication message; at most {MAX_AUTH_MESSAGE} are accepted"
                    ));
                }
                self.remaining = body;
                self.body.clear();
            }
            let take = self.remaining.min(bytes.len());
            if self.header[0] == b'R' {
                self.body.extend_from_slice(&bytes[..take]);
            }
            bytes = &bytes[take..];
            self.remaining -= take;
            if self.remaining > 0 {
                break;
            }
            let tag = self.header[0];
            self.header.clear();
            match tag {
                b'R' => {
                    let Some(code) = self.body.get(..4) else {
                        return self.refuse("short authentication message".into());
                    };
                    let code = i32::from_be_bytes(code.try_into().expect("4 bytes"));
                    let body = std::mem::take(&mut self.body);
                    if let Err(reason) = self.check.on_request(code, &body[4..]) {
                        return self.refuse(reason);
                    }
                    self.passive = self.check.done();
                }
                // An error ends the exchange; the stack reports it.
                b'E' => self.passive = true,
                _ => {}
            }
        }
        Ok(())
    }

    fn refuse(&mut self, reason: String) -> Result<(), String> {
        self.refused = Some(reason.clone());
        Err(reason)
    }
}

/// The error a watched stream returns when the watch refuses: found again by
/// [`refusal`] in a tokio-postgres error's chain.
#[derive(Debug)]
pub struct AuthRefused(pub String);

impl fmt::Display for AuthRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "authentication refused: {}", self.0)
    }
}

impl std::error::Error for AuthRefused {}

/// The refusal in an error's source chain, if the watch refused the connection.
pub fn refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a str> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(refused) = e.downcast_ref::<AuthRefused>() {
            return Some(&refused.0);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(refused) = inner.downcast_ref::<AuthRefused>()
        {
            return Some(&refused.0);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(require: &str, binding: ChannelBinding) -> AuthPolicy {
        AuthPolicy {
            require_auth: require.parse().unwrap(),
            channel_binding: binding,
        }
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn auth(code: i32, data: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(data);
        frame(b'R', &body)
    }

    #[test]
    fn require_auth_parses_as_libpq() {
        let r: RequireAuth = "scram-sha-256".parse().unwrap();
        assert!(r.allows(Method::ScramSha256));
        assert!(!r.allows(Method::Md5) && !r.allows(Method::None));
        let r: RequireAuth = "!password,!md5".parse().unwrap();
        assert!(r.allows(Method::ScramSha256) && r.allows(Method::None));
        assert!(!r.allows(Method::Password) && !r.allows(Method::Md5));
        assert_eq!(r.to_string(), "none,scram-sha-256");
        for bad in [
            "md5,!password",
            "gss",
            "md5,md5",
            "",
            "!none,!password,!md5,!scram-sha-256",
        ] {
            let err = bad.parse::<RequireAuth>().unwrap_err();
            assert!(err.contains("require_auth"), "{bad}: {err}");
        }
        assert!(RequireAuth::default().is_default());
        assert!("bogus".parse::<ChannelBinding>().is_err());
    }

    #[test]
    fn a_downgrade_to_a_cleartext_password_or_trust_is_refused() {
        let mut check = AuthCheck::new(policy("scram-sha-256", ChannelBinding::Prefer));
        let err = check.on_request(3, &[]).unwrap_err();
        assert!(
            err.contains("cleartext password") && err.contains("require_auth=scram-sha-256"),
            "{err}"
        );
        let mut check = AuthCheck::new(policy("scram-sha-256", ChannelBinding::Prefer));
        let err = check.on_request(0, &[]).unwrap_err();
        assert!(err.contains("trust"), "{err}");
        let mut check = AuthCheck::new(AuthPolicy::default());
        check.on_request(0, &[]).unwrap();
        assert!(check.done());
    }

    #[test]
    fn ok_after_scram_needs_the_server_signature() {
        let mut check = AuthCheck::new(AuthPolicy::default());
        check.on_request(10, b"SCRAM-SHA-256\0\0").unwrap();
        check.on_request(11, b"r=abc,s=c2FsdA==,i=4096").unwrap();
        let err = check.on_request(0, &[]).unwrap_err();
        assert!(err.contains("SCRAM server signature"), "{err}");
        let mut check = AuthCheck::new(AuthPolicy::default());
        check.on_request(10, b"SCRAM-SHA-256\0\0").unwrap();
        check.on_request(11, b"r=abc,s=c2FsdA==,i=4096").unwrap();
        check.on_request(12, b"v=xyz").unwrap();
        check.on_request(0, &[]).unwrap();
    }

    #[test]
    fn the_iteration_count_is_bounded() {
        let mut check = AuthCheck::new(AuthPolicy::default());
        check.on_request(10, b"SCRAM-SHA-256\0\0").unwrap();
        let err = check
            .on_request(11, b"r=abc,s=c2FsdA==,i=2147483647")
            .unwrap_err();
        assert!(err.contains("2147483647 SCRAM iterations"), "{err}");
        assert!(check_server_first(b"r=a,s=b,i=0").is_err());
        assert!(check_server_first(b"r=a,s=b").is_err());
        check_server_first(format!("r=a,s=b,i={MAX_SCRAM_ITERATIONS}").as_bytes()).unwrap();
    }

    #[test]
    fn channel_binding_require_needs_plus_over_tls() {
        let require = policy("scram-sha-256", ChannelBinding::Require);
        let mut plain = AuthCheck::new(require);
        let err = plain
            .on_request(10, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0")
            .unwrap_err();
        assert!(err.contains("not TLS"), "{err}");
        let mut tls = AuthCheck::new(require);
        tls.set_tls(true);
        let err = tls.on_request(10, b"SCRAM-SHA-256\0\0").unwrap_err();
        assert!(err.contains("does not offer SCRAM-SHA-256-PLUS"), "{err}");
        let mut unbound = AuthCheck::new(require);
        unbound.set_tls(false);
        let err = unbound
            .on_request(10, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0")
            .unwrap_err();
        assert!(err.contains("gives no channel binding"), "{err}");
        let mut tls = AuthCheck::new(require);
        tls.set_tls(true);
        tls.on_request(10, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0")
            .unwrap();
        assert!(tls.use_plus());
        let mut trust = AuthCheck::new(policy("none,scram-sha-256", ChannelBinding::Require));
        trust.set_tls(true);
        assert!(
            trust
                .on_request(0, &[])
                .unwrap_err()
                .contains("channel_binding=require")
        );
        let mut disabled = AuthCheck::new(policy("scram-sha-256", ChannelBinding::Disable));
        disabled.set_tls(true);
        disabled
            .on_request(10, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0")
            .unwrap();
        assert!(!disabled.use_plus());
    }

    #[test]
    fn the_watch_reads_frames_split_anywhere_and_goes_passive_after_ok() {
        let mut stream = Vec::new();
        stream.extend(auth(10, b"SCRAM-SHA-256\0\0"));
        stream.extend(auth(11, b"r=abc,s=c2FsdA==,i=4096"));
        stream.extend(frame(b'N', b"notice"));
        stream.extend(auth(12, b"v=xyz"));
        stream.extend(auth(0, &[]));
        // After AuthenticationOk anything goes, also what would look like a request.
        stream.extend(auth(3, &[]));
        for chunk in [1, 2, 3, 7, stream.len()] {
            let mut watch = AuthWatch::new(policy("scram-sha-256", ChannelBinding::Prefer));
            for piece in stream.chunks(chunk) {
                watch.feed(piece).unwrap();
            }
            assert!(watch.check.done());
        }
        let mut watch = AuthWatch::new(policy("scram-sha-256", ChannelBinding::Prefer));
        let err = watch.feed(&auth(5, b"salt")).unwrap_err();
        assert!(err.contains("md5"), "{err}");
        assert_eq!(watch.refused(), Some(err.as_str()));
        assert!(watch.feed(b"more").is_err());
        let mut watch = AuthWatch::new(AuthPolicy::default());
        let mut huge = vec![b'R'];
        huge.extend_from_slice(&(MAX_AUTH_MESSAGE as u32 + 100).to_be_bytes());
        assert!(watch.feed(&huge).is_err());
    }

    #[test]
    fn a_refusal_is_found_in_an_error_chain() {
        let io = std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            AuthRefused("why".into()),
        );
        assert_eq!(refusal(&io), Some("why"));
        let other = std::io::Error::other("x");
        assert_eq!(refusal(&other), None);
    }
}
