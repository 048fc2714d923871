//! `[web]`: where the dashboard listens, whether it may act, and who may
//! see it. Credentials come from the environment only (`WFQ_WEB_TOKEN`, or
//! `WFQ_WEB_USER` and `WFQ_WEB_PASSWORD`), never from the file.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{Environment, parse_duration};

/// Where the dashboard listens when `[web] listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9188";
/// The environment variable holding the bearer token.
pub const TOKEN_ENV: &str = "WFQ_WEB_TOKEN";
/// The environment variables holding basic-auth credentials.
pub const USER_ENV: &str = "WFQ_WEB_USER";
/// See [`USER_ENV`].
pub const PASSWORD_ENV: &str = "WFQ_WEB_PASSWORD";
/// Shortest token accepted: a guessable token is no protection.
pub const MIN_SECRET_CHARS: usize = 16;

/// The validated `[web]` table.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// Hide every action and refuse every POST.
    pub read_only: bool,
    /// Who may see the dashboard.
    pub auth: WebAuth,
    /// Longest a dashboard statement may run (`statement_timeout` of its pool).
    pub statement_timeout: Duration,
}

/// How requests prove who they are.
#[derive(Clone, PartialEq, Eq)]
pub enum WebAuth {
    /// Nobody is asked (loopback only).
    Open,
    /// `Authorization: Bearer TOKEN`, or basic auth with TOKEN as the password.
    Token(String),
    /// Basic auth with this user and password.
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
}

impl std::fmt::Debug for WebAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WebAuth::Open => "Open",
            WebAuth::Token(_) => "Token(***)",
            WebAuth::Basic { .. } => "Basic(***)",
        })
    }
}

/// The `[web]` table as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawWebConfig {
    listen: Option<String>,
    read_only: Option<bool>,
    statement_timeout: Option<String>,
}

impl RawWebConfig {
    /// Checks the table and reads the credentials from `env`; `Err` is the
    /// dotted key and what is wrong with it.
    pub fn parse(self, env: &dyn Environment) -> Result<WebConfig, (String, String)> {
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN).trim();
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            (
                "web.listen".to_owned(),
                format!(
                    "`{listen_text}` is not an IP address with a port (e.g. \"{DEFAULT_LISTEN}\")"
                ),
            )
        })?;
        let statement_timeout = match &self.statement_timeout {
            None => Duration::from_secs(5),
            Some(text) => match parse_duration(text) {
                Ok(d) if d >= Duration::from_millis(100) => d,
                Ok(_) => {
                    return Err((
                        "web.statement_timeout".into(),
                        "must be at least 100ms".into(),
                    ));
                }
                Err(m) => return Err(("web.statement_timeout".into(), m)),
            },
        };
        let auth = auth_from_env(env).map_err(|m| ("web".to_owned(), m))?;
        check_exposure(listen, &auth).map_err(|m| ("web.listen".to_owned(), m))?;
        Ok(WebConfig {
            listen,
            read_only: self.read_only.unwrap_or(false),
            auth,
            statement_timeout,
        })
    }
}

impl WebConfig {
    /// The defaults (loopback, actions on) with credentials from `env`.
    pub fn defaults(env: &dyn Environment) -> Result<WebConfig, (String, String)> {
        RawWebConfig::default().parse(env)
    }

    /// The same configuration listening on `listen`, refused when that
    /// exposes an unauthenticated dashboard.
    pub fn with_listen(mut self, listen: SocketAddr) -> Result<WebConfig, String> {
        check_exposure(listen, &self.auth)?;
        self.listen = listen;
        Ok(self)
    }
}

/// The credentials in the environment: a token, or a user and password.
fn auth_from_env(env: &dyn Environment) -> Result<WebAuth, String> {
    let token = env.var(TOKEN_ENV);
    let user = env.var(USER_ENV);
    let password = env.var(PASSWORD_ENV);
    match (token, user, password) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(format!(
            "set either {TOKEN_ENV} or {USER_ENV} and {PASSWORD_ENV}, not both"
        )),
        (Some(token), None, None) if token.chars().count() < MIN_SECRET_CHARS => Err(format!(
            "{TOKEN_ENV} is shorter than {MIN_SECRET_CHARS} characters"
        )),
        (Some(token), None, None) => Ok(WebAuth::Token(token)),
        (None, Some(user), Some(password)) if password.chars().count() < MIN_SECRET_CHARS => {
            let _ = user;
            Err(format!(
                "{PASSWORD_ENV} is shorter than {MIN_SECRET_CHARS} characters"
            ))
        }
        (None, Some(user), Some(password)) => Ok(WebAuth::Basic { user, password }),
        (None, Some(_), None) => Err(format!("{USER_ENV} is set but {PASSWORD_ENV} is not")),
        (None, None, Some(_)) => Err(format!("{PASSWORD_ENV} is set but {USER_ENV} is not")),
        (None, None, None) => Ok(WebAuth::Open),
    }
}

/// Refuses a dashboard that anyone on the network could reach without
/// credentials: any address but loopback needs authentication.
pub fn check_exposure(listen: SocketAddr, auth: &WebAuth) -> Result<(), String> {
    if listen.ip().is_loopback() || *auth != WebAuth::Open {
        return Ok(());
    }
    Err(format!(
        "{listen} is not a loopback address, and the dashboard shows runs, money and actions: \
         set {TOKEN_ENV} (at least {MIN_SECRET_CHARS} characters), or {USER_ENV} and \
         {PASSWORD_ENV}, in the environment, or listen on 127.0.0.1"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Env(HashMap<&'static str, &'static str>);
    impl Environment for Env {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn parse(listen: &str, env: &[(&'static str, &'static str)]) -> Result<WebConfig, String> {
        let raw: RawWebConfig = toml::from_str(&format!("listen = \"{listen}\"")).unwrap();
        raw.parse(&Env(env.iter().copied().collect()))
            .map_err(|(k, m)| format!("{k}: {m}"))
    }

    #[test]
    fn exposure_needs_credentials() {
        const TOKEN: &[(&str, &str)] = &[(TOKEN_ENV, "0123456789abcdef0123")];
        const BASIC: &[(&str, &str)] = &[(USER_ENV, "ops"), (PASSWORD_ENV, "a long password here")];
        type Case = (
            &'static str,
            &'static [(&'static str, &'static str)],
            Result<(), &'static str>,
        );
        let cases: &[Case] = &[
            ("127.0.0.1:0", &[], Ok(())),
            ("[::1]:9188", &[], Ok(())),
            ("0.0.0.0:9188", &[], Err("is not a loopback address")),
            ("10.1.2.3:9188", &[], Err("is not a loopback address")),
            ("0.0.0.0:9188", TOKEN, Ok(())),
            ("0.0.0.0:9188", BASIC, Ok(())),
            ("0.0.0.0:9188", &[(TOKEN_ENV, "short")], Err("shorter than")),
            ("0.0.0.0:9188", &[(USER_ENV, "ops")], Err("is not")),
            ("localhost:9188", &[], Err("not an IP address")),
        ];
        for (listen, env, expected) in cases {
            let got = parse(listen, env);
            match expected {
                Ok(()) => assert!(got.is_ok(), "{listen} {env:?}: {got:?}"),
                Err(text) => {
                    let message = got.expect_err(listen);
                    assert!(message.contains(text), "{listen}: {message}");
                    assert!(!message.contains("0123456789abcdef"), "{message}");
                }
            }
        }
    }

    #[test]
    fn a_listen_override_is_checked_too() {
        let config = WebConfig::defaults(&Env(HashMap::new())).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert!(config.with_listen("0.0.0.0:1".parse().unwrap()).is_err());
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = parse("127.0.0.1:1", &[(TOKEN_ENV, "0123456789abcdef0123")]).unwrap();
        assert!(!format!("{config:?}").contains("0123456789"));
    }
}
