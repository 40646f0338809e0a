//! Who made a change: the identity message before it in its transaction, as the
//! source read it (see `crate::identity` for where the message comes from and when it
//! is trusted).

use serde_json::{Map, Value as Json};

/// The prefix of identity messages (`pg_logical_emit_message`).
pub const MESSAGE_PREFIX: &str = "airlock.identity";

/// Where an asserted actor came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorClaim {
    /// `SET [LOCAL] airlock.actor = '…'`.
    AirlockActor,
    /// The `sub` of `request.jwt.claims` (PostgREST, Supabase).
    JwtSub,
    /// `x-hasura-user-id` of `hasura.user` (Hasura).
    HasuraUser,
}

impl ActorClaim {
    pub fn name(self) -> &'static str {
        match self {
            ActorClaim::AirlockActor => "airlock.actor",
            ActorClaim::JwtSub => "request.jwt.claims.sub",
            ActorClaim::HasuraUser => "hasura.user.x-hasura-user-id",
        }
    }
}

/// Who made a change, as the identity message before it says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Verified: the role that logged in (`session_user`).
    pub session_user: String,
    /// Verified: the role in effect: the one set with `SET ROLE`, else the login
    /// role. `None` only when the policy withheld it.
    pub role: Option<String>,
    /// Verified: the client's address (`inet_client_addr()`), `None` over a Unix socket.
    pub client_addr: Option<String>,
    /// Verified: the backend's process id.
    pub pid: Option<i64>,
    /// Asserted: `application_name`, `None` when empty.
    pub application_name: Option<String>,
    /// Asserted: the actor the client names, and where it named it.
    pub actor: Option<(String, ActorClaim)>,
}

/// Why an identity message could not be read.
#[derive(Debug, thiserror::Error)]
#[error("an `{MESSAGE_PREFIX}` message is not an identity: {0}")]
pub struct IdentityError(String);

impl Identity {
    /// Reads the message the function emits: a JSON object with `session_user`,
    /// `role`, `client_addr`, `pid`, `application_name`, and the raw `actor`, `jwt`
    /// and `hasura` settings (empty or missing when unset).
    pub fn parse(content: &[u8]) -> Result<Identity, IdentityError> {
        let json: Json = serde_json::from_slice(content)
            .map_err(|e| IdentityError(format!("not JSON ({e})")))?;
        let object = json
            .as_object()
            .ok_or_else(|| IdentityError("not a JSON object".into()))?;
        let text = |key: &str| -> Option<String> {
            object
                .get(key)
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let session_user =
            text("session_user").ok_or_else(|| IdentityError("no `session_user`".into()))?;
        let pid = match object.get("pid") {
            Some(Json::Number(n)) => n.as_i64(),
            Some(Json::String(s)) => s.parse().ok(),
            _ => None,
        };
        let claim = |raw: Option<String>, key: &str| -> Option<String> {
            let json: Json = serde_json::from_str(&raw?).ok()?;
            match json.get(key)? {
                Json::String(s) if !s.is_empty() => Some(s.clone()),
                Json::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let actor = text("actor")
            .map(|a| (a, ActorClaim::AirlockActor))
            .or_else(|| claim(text("jwt"), "sub").map(|a| (a, ActorClaim::JwtSub)))
            .or_else(|| {
                claim(text("hasura"), "x-hasura-user-id").map(|a| (a, ActorClaim::HasuraUser))
            });
        Ok(Identity {
            // `SET ROLE NONE` (or no SET ROLE) reads `none`: the session's role.
            role: Some(
                text("role")
                    .filter(|r| r != "none")
                    .unwrap_or_else(|| session_user.clone()),
            ),
            session_user,
            client_addr: text("client_addr"),
            pid,
            application_name: text("application_name"),
            actor,
        })
    }

    /// The spine's `actor`: what PostgreSQL verified and what the client asserted,
    /// apart.
    pub fn to_json(&self) -> Json {
        let mut verified = Map::new();
        verified.insert("session_user".into(), self.session_user.clone().into());
        verified.insert("role".into(), self.role.clone().into());
        verified.insert("client_addr".into(), self.client_addr.clone().into());
        verified.insert("pid".into(), self.pid.into());
        let mut asserted = Map::new();
        asserted.insert(
            "application_name".into(),
            self.application_name.clone().into(),
        );
        asserted.insert(
            "actor".into(),
            self.actor.as_ref().map(|(a, _)| a.clone()).into(),
        );
        asserted.insert(
            "actor_from".into(),
            self.actor.as_ref().map(|(_, c)| c.name()).into(),
        );
        let mut out = Map::new();
        out.insert("verified".into(), Json::Object(verified));
        out.insert("asserted".into(), Json::Object(asserted));
        Json::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_message_is_read_with_its_actor_from_the_first_claim_set() {
        let message = br#"{"session_user": "app", "role": "none", "client_addr": "10.0.0.7", "pid": 4242,
            "application_name": "", "actor": "", "jwt": "{\"sub\": \"user-17\", \"role\": \"authenticated\"}",
            "hasura": "{\"x-hasura-user-id\": \"9\"}"}"#;
        let identity = Identity::parse(message).unwrap();
        assert_eq!(identity.session_user, "app");
        assert_eq!(identity.role.as_deref(), Some("app"));
        assert_eq!(identity.client_addr.as_deref(), Some("10.0.0.7"));
        assert_eq!(identity.pid, Some(4242));
        assert_eq!(identity.application_name, None);
        assert_eq!(
            identity.actor,
            Some(("user-17".to_owned(), ActorClaim::JwtSub))
        );

        let explicit = br#"{"session_user": "app", "role": "billing", "pid": "7", "actor": "alice",
            "jwt": "{\"sub\": \"user-17\"}"}"#;
        let identity = Identity::parse(explicit).unwrap();
        assert_eq!(identity.role.as_deref(), Some("billing"));
        assert_eq!(identity.pid, Some(7));
        assert_eq!(
            identity.actor,
            Some(("alice".to_owned(), ActorClaim::AirlockActor))
        );
        let json = identity.to_json();
        assert_eq!(json["verified"]["role"], "billing");
        assert_eq!(json["asserted"]["actor"], "alice");
        assert_eq!(json["asserted"]["actor_from"], "airlock.actor");
        assert!(json["verified"].get("actor").is_none());

        let hasura = br#"{"session_user": "hasura", "hasura": "{\"x-hasura-user-id\": 9}", "jwt": "not json"}"#;
        assert_eq!(
            Identity::parse(hasura).unwrap().actor,
            Some(("9".to_owned(), ActorClaim::HasuraUser))
        );
    }

    #[test]
    fn a_message_that_is_not_an_identity_is_an_error_naming_why() {
        for (bad, why) in [
            (&b"not json"[..], "not JSON"),
            (b"[1]", "not a JSON object"),
            (b"{\"role\": \"x\"}", "session_user"),
        ] {
            let error = Identity::parse(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{error}");
        }
    }
}
