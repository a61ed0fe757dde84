//! Creates a vault's local files on first start (`ferry up`): CA, component server
//! certificate, the service client certificate, the data key and the admin token.

use std::path::Path;

use rand::RngCore;

use crate::config::MeshConfig;
use crate::error::MeshError;
use crate::pki::{Identity, PkiError, VaultCa, write_file, write_secret};
use crate::server::read;

/// The name in the service certificate (`service:ferry`).
pub const SERVICE_NAME: &str = "ferry";

/// Creates every vault file named in `cfg` that does not exist yet, and leaves existing ones
/// alone, so it is safe to run on every start. `server_sans` are extra DNS names or IP
/// addresses for the server certificate (`localhost`, `127.0.0.1` and `::1` are always in).
pub fn bootstrap_vault(cfg: &MeshConfig, server_sans: &[String]) -> Result<(), MeshError> {
    let cfg = &cfg.with_resolved_paths();
    let tls = &cfg.tls;
    let need_server = !tls.server_cert.exists() || !tls.server_key.exists();
    let need_service = !tls.service_cert.exists() || !tls.service_key.exists();
    if !tls.ca_cert.exists() || need_server || need_service {
        let ca = load_or_create_ca(cfg)?;
        if need_server {
            let (cert, key) = ca.issue_server(server_sans)?;
            write_pair(&tls.server_cert, &cert, &tls.server_key, &key)?;
            tracing::info!(path = %tls.server_cert.display(), "created the server certificate");
        }
        if need_service {
            let (cert, key) = ca.issue_client(&Identity::Service(SERVICE_NAME.into()))?;
            write_pair(&tls.service_cert, &cert, &tls.service_key, &key)?;
            tracing::info!(path = %tls.service_cert.display(), "created the service certificate");
        }
    }
    let key_file = &cfg.vault.data_key_file;
    if !key_file.exists() {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        write_secret(key_file, &key).map_err(|e| io_err(key_file, e))?;
        tracing::info!(path = %key_file.display(), "created the vault data key");
    }
    let token_file = &cfg.vault.admin_token_file;
    if !token_file.exists() {
        let mut token = [0u8; 32];
        rand::rng().fill_bytes(&mut token);
        write_secret(token_file, hex::encode(token).as_bytes())
            .map_err(|e| io_err(token_file, e))?;
        tracing::info!(path = %token_file.display(), "created the admin token");
    }
    Ok(())
}

/// The vault CA from the files in `cfg` (needs `tls.ca_key`), e.g. for the registry to sign
/// host certificates.
pub fn load_ca(cfg: &MeshConfig) -> Result<VaultCa, MeshError> {
    let cfg = &cfg.with_resolved_paths();
    let key_path = cfg.tls.ca_key.as_ref().ok_or_else(|| {
        PkiError::Tls("tls.ca_key is not set: this node cannot sign certificates".into())
    })?;
    Ok(VaultCa::from_pem(
        &read(&cfg.tls.ca_cert)?,
        &read(key_path)?,
    )?)
}

fn load_or_create_ca(cfg: &MeshConfig) -> Result<VaultCa, MeshError> {
    if cfg.tls.ca_cert.exists() {
        return load_ca(cfg);
    }
    let key_path =
        cfg.tls.ca_key.as_ref().ok_or_else(|| {
            PkiError::Tls("tls.ca_key is not set: cannot create the vault ca".into())
        })?;
    let ca = VaultCa::create(&cfg.vault.id)?;
    // Key first: a certificate without its key would make the next start fail.
    write_secret(key_path, ca.key_pem().as_bytes()).map_err(|e| io_err(key_path, e))?;
    write_file(&cfg.tls.ca_cert, ca.cert_pem().as_bytes(), 0o644)
        .map_err(|e| io_err(&cfg.tls.ca_cert, e))?;
    tracing::info!(vault = %cfg.vault.id, path = %cfg.tls.ca_cert.display(), "created the vault ca");
    Ok(ca)
}

fn write_pair(cert_path: &Path, cert: &str, key_path: &Path, key: &str) -> Result<(), MeshError> {
    write_secret(key_path, key.as_bytes()).map_err(|e| io_err(key_path, e))?;
    write_file(cert_path, cert.as_bytes(), 0o644).map_err(|e| io_err(cert_path, e))?;
    Ok(())
}

fn io_err(path: &Path, source: std::io::Error) -> MeshError {
    PkiError::Io {
        path: path.display().to_string(),
        source,
    }
    .into()
}
