//! Operator tokens (`ferry token create|list|revoke`): random, shown once, kept in the catalog
//! only as hashes, with a role and an optional expiry. The registry's own authenticator reads
//! them from its state; every other component polls `ListTokenGrants`.
use ferry_mesh::{Role, TokenGrant};
use ferry_proto::now_ms;
use ferry_proto::registry::v1 as pb;
use tonic::{Request, Response};

use super::{R, RegistryService};
use crate::error::RegistryError;
use crate::state::{Event, State, TokenRecord};

/// The longest expiry a token may have (about ten years) and the shortest.
pub const MAX_EXPIRES_SECS: u64 = 3660 * 24 * 3600;
pub const MIN_EXPIRES_SECS: u64 = 60;

impl RegistryService {
    pub(super) async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> R<pb::CreateTokenResponse> {
        ferry_mesh::require_role(&req, Role::Admin)?;
        let req = req.into_inner();
        let role = check_request(&req)?;
        let token = format!("ferry_{}", hex::encode(rand::random::<[u8; 32]>()));
        let now = now_ms();
        let rec = TokenRecord {
            name: req.name.clone(),
            role: role.as_str().to_owned(),
            hash: ferry_mesh::token_hash(&token),
            created_at_ms: now,
            expires_at_ms: match req.expires_in_seconds {
                0 => 0,
                s => now + (s as i64) * 1000,
            },
            revoked: false,
        };
        let saved = rec.clone();
        self.persist_checked(move |st| {
            if st.tokens.get(&rec.name).is_some_and(|t| !t.revoked) {
                return Err(RegistryError::AlreadyExists(format!(
                    "a token named {} exists; revoke it first or choose another name",
                    rec.name
                )));
            }
            Ok((vec![Event::TokenCreated(rec)], ()))
        })
        .await?;
        tracing::info!(token_name = %saved.name, role = %saved.role, expires_at_ms = saved.expires_at_ms, "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            info: Some(info(&saved)),
            token,
        }))
    }

    pub(super) async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> R<pb::ListTokensResponse> {
        ferry_mesh::require_role(&req, Role::Admin)?;
        let st = self.state.lock().await;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: st.tokens.values().map(info).collect(),
        }))
    }

    pub(super) async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> R<pb::TokenInfo> {
        ferry_mesh::require_role(&req, Role::Admin)?;
        let name = req.into_inner().name;
        let rec = self
            .persist_checked(|st| match st.tokens.get(&name) {
                None => Err(RegistryError::NotFound(format!("no token named {name:?}"))),
                Some(t) if t.revoked => Err(RegistryError::FailedPrecondition(format!(
                    "token {name} is already revoked"
                ))),
                Some(t) => {
                    let mut t = t.clone();
                    t.revoked = true;
                    Ok((vec![Event::TokenRevoked { name: name.clone() }], t))
                }
            })
            .await?;
        tracing::info!(token_name = %name, "token revoked");
        Ok(Response::new(info(&rec)))
    }

    pub(super) async fn list_token_grants(
        &self,
        req: Request<pb::ListTokenGrantsRequest>,
    ) -> R<pb::ListTokenGrantsResponse> {
        ferry_mesh::require_service(&req)?;
        let st = self.state.lock().await;
        let grants = in_force(&st)
            .map(|t| pb::TokenGrant {
                name: t.name.clone(),
                role: t.role.clone(),
                hash: t.hash.clone(),
                expires_at_ms: t.expires_at_ms,
            })
            .collect();
        Ok(Response::new(pb::ListTokenGrantsResponse { grants }))
    }
}

/// The role asked for, once the name, role and expiry are checked.
fn check_request(req: &pb::CreateTokenRequest) -> Result<Role, RegistryError> {
    let name_ok = !req.name.is_empty()
        && req.name.len() <= 64
        && req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(RegistryError::InvalidArgument(format!(
            "token name {:?} must be 1-64 letters, digits, '-', '_' or '.'",
            req.name
        )));
    }
    let role = req
        .role
        .parse::<Role>()
        .map_err(RegistryError::InvalidArgument)?;
    let s = req.expires_in_seconds;
    if s != 0 && !(MIN_EXPIRES_SECS..=MAX_EXPIRES_SECS).contains(&s) {
        return Err(RegistryError::InvalidArgument(format!(
            "a token expires after {MIN_EXPIRES_SECS} s to {MAX_EXPIRES_SECS} s (or never: 0), not {s} s"
        )));
    }
    Ok(role)
}

fn in_force(st: &State) -> impl Iterator<Item = &TokenRecord> {
    st.tokens.values().filter(|t| !t.revoked)
}

/// The grants the registry's own authenticator accepts (expiry is checked per call).
pub(crate) fn grants(st: &State) -> Vec<TokenGrant> {
    in_force(st)
        .filter_map(|t| {
            Some(TokenGrant {
                name: t.name.clone(),
                role: t.role.parse().ok()?,
                hash: blake3::Hash::from_hex(&t.hash).ok()?,
                expires_at_ms: t.expires_at_ms,
            })
        })
        .collect()
}

fn info(t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        name: t.name.clone(),
        role: t.role.clone(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
        revoked: t.revoked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, role: &str, expires: u64) -> pb::CreateTokenRequest {
        pb::CreateTokenRequest {
            name: name.into(),
            role: role.into(),
            expires_in_seconds: expires,
        }
    }

    #[test]
    fn names_roles_and_expiry_are_checked_not_changed() {
        assert_eq!(
            check_request(&req("alice", "contributor", 0)).unwrap(),
            Role::Contributor
        );
        for bad in ["", "a/b", "../x", &"x".repeat(65)] {
            let e = check_request(&req(bad, "reader", 0))
                .unwrap_err()
                .to_string();
            assert!(e.contains("1-64"), "{e}");
        }
        let e = check_request(&req("a", "root", 0)).unwrap_err().to_string();
        assert!(e.contains("reader, operator, contributor or admin"), "{e}");
        let e = check_request(&req("a", "reader", 59))
            .unwrap_err()
            .to_string();
        assert!(e.contains("60 s to") && e.contains("not 59 s"), "{e}");
        assert!(check_request(&req("a", "reader", MAX_EXPIRES_SECS + 1)).is_err());
        assert!(check_request(&req("a", "reader", 60)).is_ok());
    }
}
