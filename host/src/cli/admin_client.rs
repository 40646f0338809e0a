//! The admin API's client, for `airlock status`, `reload` and `compact`: where the
//! host listens, which token to send, and what the answer means.

use std::path::PathBuf;

use anyhow::Context;

/// How to reach a running host's admin API.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The host's configuration: its [admin] listen address and token are used.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The admin API address, when not taken from --config.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub admin: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "AIRLOCK_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl AdminArgs {
    /// The admin address and the token to send: the configured one, `--token`, or the
    /// per-run token a host without one keeps for its own user.
    pub fn resolve(&self) -> anyhow::Result<(String, Option<String>)> {
        let (addr, token) = match &self.config {
            Some(path) => {
                let config = crate::config::Config::load(path)?;
                (
                    config.admin.listen.to_string(),
                    config.admin.token.or_else(|| self.token.clone()),
                )
            }
            None => (self.admin.clone(), self.token.clone()),
        };
        let token = token.or_else(|| addr.parse().ok().and_then(crate::admin::read_local_token));
        Ok((addr, token))
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let (addr, token) = self.resolve()?;
        // Redirects are not followed: the answer must be the admin API's own.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut request = client.request(method, format!("http://{addr}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Ok(request)
    }
}

/// Why a request to the admin API got no answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nothing answers at the address: no host runs there.
    #[error("cannot reach the admin API at {addr}: is `airlock run` running there?")]
    Unreachable {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Sends one request; the status code and the JSON answer.
pub async fn send(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
) -> Result<(u16, serde_json::Value), AdminError> {
    let (addr, _) = admin.resolve()?;
    let response = admin
        .request(method, path)?
        .send()
        .await
        .map_err(|source| AdminError::Unreachable { addr, source })?;
    let code = response.status().as_u16();
    let body = response
        .json()
        .await
        .context("the admin API answered with something other than JSON")?;
    if code == 401 {
        return Err(anyhow::anyhow!(
            "the admin API refused the request: pass its token with --token or AIRLOCK_ADMIN_TOKEN"
        )
        .into());
    }
    Ok((code, body))
}
