//! Caller authentication for gRPC. The interceptor turns a verified client certificate or a
//! bearer token into a [`Caller`] in the request extensions; handlers then call
//! [`require_host`], [`require_role`] or [`require_service`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::pki::Identity;

/// Operator roles, ordered: a higher role can do everything a lower one can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Reader,
    Operator,
    Contributor,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Contributor => "contributor",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "reader" => Ok(Role::Reader),
            "operator" => Ok(Role::Operator),
            "contributor" => Ok(Role::Contributor),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "unknown role {s:?} (expected reader, operator, contributor or admin)"
            )),
        }
    }
}

/// Who is calling, as established by the [`AuthInterceptor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A registered host, by its client certificate.
    Host(String),
    /// A Ferry component, by the service certificate.
    Service(String),
    /// An operator, by bearer token: the token's role and name (`ferry token create --name`;
    /// a token from the config is named after its role, the vault's own token `admin`).
    Operator { role: Role, token: String },
    /// No credentials (health checks, reflection).
    Anonymous,
}

impl Caller {
    /// An operator caller with `role`, by the token named `token`.
    pub fn operator(role: Role, token: &str) -> Self {
        Caller::Operator {
            role,
            token: token.to_owned(),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Host(name) => write!(f, "host:{name}"),
            Caller::Service(name) => write!(f, "service:{name}"),
            Caller::Operator { role, token } => write!(f, "token:{token} ({role})"),
            Caller::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// Returns true when a host certificate must no longer be accepted: called with the host name
/// and the certificate's serial number (lowercase hex; empty when unknown).
pub type RevocationCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Checks callers' credentials. Tokens are kept only as BLAKE3 hashes.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Arc<Vec<(blake3::Hash, Role)>>,
    /// Where audited calls are recorded (see [`crate::audit`]); none: nothing is recorded.
    audit: Option<Arc<dyn ferry_model::AuditSink>>,
    /// Tokens made with `ferry token create`, as the registry last listed them.
    grants: TokenGrants,
    revoked: RevocationCheck,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Default for Authenticator {
    fn default() -> Self {
        Self::new(std::iter::empty::<(String, Role)>())
    }
}

impl Authenticator {
    /// An authenticator accepting the given (token, role) pairs and no revoked hosts.
    pub fn new<T: AsRef<str>>(tokens: impl IntoIterator<Item = (T, Role)>) -> Self {
        let tokens = tokens
            .into_iter()
            .map(|(token, role)| (hash_token(token.as_ref()), role))
            .collect();
        Self {
            tokens: Arc::new(tokens),
            audit: None,
            grants: TokenGrants::default(),
            revoked: Arc::new(|_, _| false),
        }
    }

    /// An authenticator accepting one admin token.
    pub fn with_admin_token(token: &str) -> Self {
        Self::new([(token, Role::Admin)])
    }

    /// Adds a token with a role.
    pub fn add_token(mut self, token: &str, role: Role) -> Self {
        Arc::make_mut(&mut self.tokens).push((hash_token(token), role));
        self
    }

    /// Adds a token known only by its hash ([`token_hash`]), so a token store never needs
    /// to hold the tokens themselves.
    pub fn add_token_hash(mut self, hash_hex: &str, role: Role) -> Result<Self, Status> {
        let hash = blake3::Hash::from_hex(hash_hex.trim())
            .map_err(|_| Status::invalid_argument("a token hash is 64 hex characters"))?;
        Arc::make_mut(&mut self.tokens).push((hash, role));
        Ok(self)
    }

    /// Also accepts the tokens of `grants` (kept current by their owner).
    pub fn with_grants(mut self, grants: TokenGrants) -> Self {
        self.grants = grants;
        self
    }

    /// Records audited calls (mutations and refusals) into `sink`.
    pub fn with_audit(mut self, sink: Arc<dyn ferry_model::AuditSink>) -> Self {
        self.audit = Some(sink);
        self
    }

    /// The audit sink, if calls are audited.
    pub fn audit_sink(&self) -> Option<&Arc<dyn ferry_model::AuditSink>> {
        self.audit.as_ref()
    }

    /// Sets the check for removed hosts.
    pub fn with_revocation(mut self, revoked: RevocationCheck) -> Self {
        self.revoked = revoked;
        self
    }

    /// The interceptor to wrap every Ferry service with
    /// (`XServer::with_interceptor(svc, auth.interceptor())`).
    pub fn interceptor(&self) -> AuthInterceptor {
        AuthInterceptor { auth: self.clone() }
    }

    /// Works out who the caller of `request` is.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if let Some(certs) = request.peer_certs()
            && let Some(leaf) = certs.first()
        {
            return self.caller_from_certificate(leaf);
        }
        let Some(header) = request.metadata().get("authorization") else {
            return Ok(Caller::Anonymous);
        };
        let header = header
            .to_str()
            .map_err(|_| Status::unauthenticated("malformed authorization header"))?;
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("malformed authorization header: expected 'Bearer <token>'")
            })?;
        let hash = hash_token(token);
        // blake3::Hash equality is constant-time.
        if let Some((_, role)) = self.tokens.iter().find(|(h, _)| *h == hash) {
            return Ok(Caller::operator(*role, role.as_str()));
        }
        match self.grants.find(&hash) {
            Some(g) if g.expired(ferry_proto::now_ms()) => {
                tracing::debug!(token_name = %g.name, "rejected an expired token");
                Err(Status::unauthenticated(format!(
                    "token {} has expired",
                    g.name
                )))
            }
            Some(g) => Ok(Caller::operator(g.role, &g.name)),
            None => {
                tracing::debug!("rejected an unknown bearer token");
                Err(Status::unauthenticated("invalid bearer token"))
            }
        }
    }

    fn caller_from_certificate(&self, leaf: &[u8]) -> Result<Caller, Status> {
        // rustls has verified the chain against the vault CA; only the name is read here.
        let identity = Identity::from_cert_der(leaf).map_err(|e| {
            tracing::debug!(error = %e, "client certificate without a ferry identity");
            Status::unauthenticated(format!("client certificate rejected: {e}"))
        })?;
        let serial = crate::pki::cert_serial_hex(leaf).unwrap_or_default();
        self.identify(identity, &serial)
    }

    /// The caller for a verified certificate identity with its serial number (hex), refusing
    /// revoked host certificates; for transports other than gRPC (the QUIC gateway).
    pub fn identify(&self, identity: Identity, serial: &str) -> Result<Caller, Status> {
        match identity {
            Identity::Host(name) => {
                if (self.revoked)(&name, serial) {
                    tracing::info!(host = %name, "rejected a call from a removed host");
                    return Err(Status::unauthenticated(format!(
                        "host {name} has been removed from the vault; register it again"
                    )));
                }
                Ok(Caller::Host(name))
            }
            Identity::Service(name) => Ok(Caller::Service(name)),
        }
    }
}

/// A token made with `ferry token create`: its name, role, hash and expiry (0 = never).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    pub name: String,
    pub role: Role,
    pub hash: blake3::Hash,
    pub expires_at_ms: i64,
}

impl TokenGrant {
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms != 0 && now_ms >= self.expires_at_ms
    }
}

/// The token grants in force, shared between whoever keeps them current (the registry from
/// its catalog, other components by polling it) and their authenticators.
#[derive(Clone, Default, Debug)]
pub struct TokenGrants(Arc<std::sync::RwLock<Vec<TokenGrant>>>);

impl TokenGrants {
    /// Replaces the grants.
    pub fn set(&self, grants: Vec<TokenGrant>) {
        if let Ok(mut g) = self.0.write() {
            *g = grants;
        }
    }

    fn find(&self, hash: &blake3::Hash) -> Option<TokenGrant> {
        // blake3::Hash equality is constant-time.
        self.0
            .read()
            .ok()?
            .iter()
            .find(|g| g.hash == *hash)
            .cloned()
    }
}

fn hash_token(token: &str) -> blake3::Hash {
    blake3::hash(token.as_bytes())
}

/// The hash under which a token is stored (BLAKE3, 64 hex characters).
pub fn token_hash(token: &str) -> String {
    hash_token(token).to_hex().to_string()
}

/// Puts the [`Caller`] into the request extensions.
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    auth: Authenticator,
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.auth.authenticate(&request)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller the interceptor established; `Anonymous` on a service without the interceptor.
pub fn caller<T>(req: &Request<T>) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anonymous)
}

fn no_credentials() -> Status {
    Status::unauthenticated(
        "this call needs credentials: a client certificate or an 'authorization: Bearer <token>' header",
    )
}

/// The calling host's name; only hosts (by certificate) pass.
pub fn require_host<T>(req: &Request<T>) -> Result<String, Status> {
    match caller(req) {
        Caller::Host(name) => Ok(name),
        Caller::Anonymous => Err(no_credentials()),
        other => Err(Status::permission_denied(format!(
            "only a registered host may make this call, not {other}"
        ))),
    }
}

/// Passes operators with at least `min`, and services (which count as admin).
pub fn require_role<T>(req: &Request<T>, min: Role) -> Result<(), Status> {
    match caller(req) {
        Caller::Operator { role, .. } if role >= min => Ok(()),
        Caller::Service(_) => Ok(()),
        Caller::Operator { role, .. } => Err(Status::permission_denied(format!(
            "this call needs the {min} role; the token has {role}"
        ))),
        Caller::Host(name) => Err(Status::permission_denied(format!(
            "host {name} may not make this call: it needs an operator with the {min} role"
        ))),
        Caller::Anonymous => Err(no_credentials()),
    }
}

/// Passes only Ferry components (the service certificate).
pub fn require_service<T>(req: &Request<T>) -> Result<(), Status> {
    match caller(req) {
        Caller::Service(_) => Ok(()),
        Caller::Anonymous => Err(no_credentials()),
        other => Err(Status::permission_denied(format!(
            "only ferry services may make this call, not {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn with_token(token: &str) -> Request<()> {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", token.parse().unwrap());
        req
    }

    #[test]
    fn tokens_map_to_roles() {
        let auth = Authenticator::with_admin_token("a-token").add_token("r-token", Role::Reader);
        let mut icpt = auth.interceptor();
        let req = icpt.call(with_token("Bearer a-token")).unwrap();
        assert_eq!(caller(&req), Caller::operator(Role::Admin, "admin"));
        assert!(require_role(&req, Role::Admin).is_ok());
        let req = icpt.call(with_token("bearer r-token")).unwrap();
        assert_eq!(caller(&req), Caller::operator(Role::Reader, "reader"));
        let denied = require_role(&req, Role::Operator).unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(
            require_host(&req).unwrap_err().code(),
            Code::PermissionDenied
        );
    }

    #[test]
    fn granted_tokens_pass_until_they_expire_or_go() {
        let grants = TokenGrants::default();
        let mut icpt = Authenticator::default()
            .with_grants(grants.clone())
            .interceptor();
        let grant = |name: &str, token: &str, expires_at_ms| TokenGrant {
            name: name.into(),
            role: Role::Contributor,
            hash: hash_token(token),
            expires_at_ms,
        };
        grants.set(vec![
            grant("bob", "bob-token", 0),
            grant("old", "old-token", ferry_proto::now_ms() - 1),
        ]);
        let req = icpt.call(with_token("Bearer bob-token")).unwrap();
        assert_eq!(caller(&req), Caller::operator(Role::Contributor, "bob"));
        assert!(require_role(&req, Role::Operator).is_ok());
        let denied = require_role(&req, Role::Admin).unwrap_err();
        assert!(denied.message().contains("admin") && denied.message().contains("contributor"));
        let err = icpt.call(with_token("Bearer old-token")).unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("old") && !err.message().contains("old-token"));
        grants.set(Vec::new());
        let err = icpt.call(with_token("Bearer bob-token")).unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[test]
    fn bad_tokens_are_not_echoed() {
        let mut icpt = Authenticator::with_admin_token("good").interceptor();
        let err = icpt.call(with_token("Bearer sekrit-value")).unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(!err.message().contains("sekrit"));
        let err = icpt.call(with_token("Basic abc")).unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[test]
    fn hashed_tokens_and_identities() {
        let auth = Authenticator::default()
            .add_token_hash(&token_hash("op-token"), Role::Operator)
            .unwrap()
            .with_revocation(Arc::new(|host: &str, serial: &str| {
                host == "gone" || serial == "0bad"
            }));
        let req = auth
            .interceptor()
            .call(with_token("Bearer op-token"))
            .unwrap();
        assert_eq!(caller(&req), Caller::operator(Role::Operator, "operator"));
        assert!(
            Authenticator::default()
                .add_token_hash("zz", Role::Admin)
                .is_err()
        );
        assert_eq!(
            auth.identify(Identity::Host("hv".into()), "01").unwrap(),
            Caller::Host("hv".into())
        );
        let err = auth
            .identify(Identity::Host("gone".into()), "01")
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = auth
            .identify(Identity::Host("hv".into()), "0bad")
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[test]
    fn anonymous_needs_credentials() {
        let mut icpt = Authenticator::default().interceptor();
        let req = icpt.call(Request::new(())).unwrap();
        assert_eq!(caller(&req), Caller::Anonymous);
        assert_eq!(
            require_service(&req).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            require_role(&req, Role::Reader).unwrap_err().code(),
            Code::Unauthenticated
        );
    }

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Reader < Role::Operator && Role::Operator < Role::Admin);
        assert_eq!("Admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
    }
}
