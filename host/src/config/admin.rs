//! `[admin]`: where the admin API listens and the token it asks for.
//!
//! Invariant: an address other than loopback has a token; without one, anyone who
//! reaches it could read the status and reload the pipeline.

use std::net::SocketAddr;

use super::check::Check;
use super::raw;

/// Where the admin API listens when `[admin] listen` is not set.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8090,
));

/// `[admin]`, checked.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

/// Checks `[admin]` (absent: every default).
pub(super) fn validate(raw: Option<raw::Admin>, check: &mut Check) -> AdminConfig {
    let a = raw.unwrap_or(raw::Admin {
        listen: None,
        token_env: None,
    });
    let listen = match a.listen {
        None => DEFAULT_LISTEN,
        Some(text) => text.parse().unwrap_or_else(|_| {
            check.add(
                "admin.listen",
                format!("found `{text}`, expected an address like `{DEFAULT_LISTEN}`"),
            );
            DEFAULT_LISTEN
        }),
    };
    let token_env_set = a.token_env.is_some();
    let token = check.secret("admin.token_env", a.token_env);
    if !listen.ip().is_loopback() && !token_env_set {
        check.add(
            "admin.listen",
            format!(
                "found `{listen}`, which is not a loopback address, and no token: anyone who \
                 reaches it could read the status and reload the pipeline; set \
                 [admin] token_env, or listen on 127.0.0.1"
            ),
        );
    }
    AdminConfig { listen, token }
}
