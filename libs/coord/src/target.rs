//! Which Redis to reach and how to authenticate: the URL, an AUTH password kept out of it, and
//! for `rediss://` the CA that signed the server's certificate.

use redis::IntoConnectionInfo;

use crate::CoordError;

/// A Redis to connect to. `Debug` never shows the password (logs use [`redact_url`]).
#[derive(Clone, Default)]
pub struct RedisTarget {
    /// `redis://host:port/db`, `rediss://…` (TLS) or `unix:///path`. It may carry a password
    /// itself (`redis://:pw@host`); `password` overrides it.
    pub url: String,
    /// The AUTH password (or the ACL user's, when the URL names a user).
    pub password: Option<String>,
    /// PEM of the CA to trust for `rediss://`; the system's roots when absent.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

impl RedisTarget {
    pub fn new(url: impl Into<String>) -> Self {
        RedisTarget {
            url: url.into(),
            ..Default::default()
        }
    }

    /// The Redis a mesh config names: `redis_url`, `redis_password_file`, `redis_ca_cert`.
    pub fn from_config(cfg: &ferry_mesh::MeshConfig) -> Result<Self, CoordError> {
        let config = |e: ferry_mesh::ConfigError| CoordError::Invalid {
            what: "redis settings".into(),
            reason: e.to_string(),
        };
        Ok(RedisTarget {
            url: cfg.redis_url.clone(),
            password: cfg.redis_password().map_err(config)?,
            ca_pem: cfg.redis_ca_pem().map_err(config)?,
        })
    }

    pub(crate) fn client(&self) -> Result<redis::Client, CoordError> {
        let mut info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| invalid_url(&self.url, e))?;
        if let Some(p) = &self.password {
            let settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(settings);
        }
        let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        match (&self.ca_pem, tls) {
            (Some(ca), true) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )
            .map_err(|e| invalid_url(&self.url, e)),
            _ => redis::Client::open(info).map_err(|e| invalid_url(&self.url, e)),
        }
    }
}

fn invalid_url(url: &str, e: redis::RedisError) -> CoordError {
    CoordError::Invalid {
        what: format!("redis url {}", redact_url(url)),
        reason: e.to_string(),
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`; URLs without a password are
/// returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    if !userinfo.contains(':') {
        // `redis://secret@host` puts the password where a user would be: redact it too.
        return format!("{scheme}://***@{}", &rest[at + 1..]);
    }
    let user = userinfo.split_once(':').map_or("", |(u, _)| u);
    format!("{scheme}://{user}:***@{}", &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(redact_url("redis://:s3cret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(
            redact_url("rediss://ferry:s3cret@h:1"),
            "rediss://ferry:***@h:1"
        );
        assert_eq!(redact_url("redis://s3cret@h"), "redis://***@h");
        assert_eq!(redact_url("redis://:p@ss@h/"), "redis://:***@h/");
        assert_eq!(
            redact_url("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
        let t = RedisTarget {
            url: "redis://:inline@h".into(),
            password: Some("other".into()),
            ca_pem: None,
        };
        let shown = format!("{t:?} {}", redact_url(&t.url));
        assert!(
            !shown.contains("inline") && !shown.contains("other"),
            "{shown}"
        );
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        let t = RedisTarget::new("redis://:s3cret@[::1");
        let Err(e) = t.client() else {
            panic!("a bad url was taken")
        };
        let e = e.to_string();
        assert!(e.contains("redis url") && !e.contains("s3cret"), "{e}");
    }
}
